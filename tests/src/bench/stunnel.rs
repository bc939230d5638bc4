//! stunnel (Debian's stunnel4) as the tunnel a user might pick instead: a client in the client
//! pod's namespace, a server in the server pod's, TLS 1.3 both ways with mutual certificate
//! checks, using certificates issued by the lab's mesh CA for the same two identities the
//! agents present.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

/// One tunnelled service: the app's port on the server pod's loopback, and the ports stunnel
/// uses for it.
#[derive(Clone, Copy, Debug)]
pub struct Service {
    /// Service name (a stunnel section).
    pub name: &'static str,
    /// The app's port in the server pod.
    pub app_port: u16,
}

impl Service {
    /// Where the stunnel server listens, on the server pod's address.
    pub fn tunnel_port(self) -> u16 {
        self.app_port + 10_000
    }

    /// Where the stunnel client listens, on the client pod's loopback.
    pub fn local_port(self) -> u16 {
        self.app_port + 20_000
    }

    /// The address a client in the client pod's namespace connects to.
    pub fn local_addr(self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.local_port())
    }
}

/// Certificate and key files for one side.
pub struct Credentials {
    /// Chain (leaf, then CA), PEM.
    pub cert: PathBuf,
    /// PKCS#8 private key, PEM.
    pub key: PathBuf,
}

/// The settings both sides share: TLS 1.3 only, mutual verification against the mesh CA,
/// Nagle off, errors-only logging into `log`.
fn common(ca_file: &Path, creds: &Credentials, log: &Path) -> String {
    format!(
        "foreground = yes\npid =\nsyslog = no\ndebug = 3\noutput = {log}\n\
         socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n\
         cert = {cert}\nkey = {key}\nCAfile = {ca}\nverifyChain = yes\nrequireCert = yes\n\
         sslVersionMin = TLSv1.3\nsslVersionMax = TLSv1.3\n",
        log = log.display(),
        cert = creds.cert.display(),
        key = creds.key.display(),
        ca = ca_file.display(),
    )
}

/// The server side's configuration: accept TLS on the server pod's address, deliver to the
/// app on the pod's loopback.
pub fn server_config(
    server_ip: Ipv4Addr,
    services: &[Service],
    ca_file: &Path,
    creds: &Credentials,
    log: &Path,
) -> String {
    let mut config = common(ca_file, creds, log);
    for service in services {
        config.push_str(&format!(
            "\n[{name}]\naccept = {server_ip}:{tunnel}\nconnect = 127.0.0.1:{app}\n",
            name = service.name,
            tunnel = service.tunnel_port(),
            app = service.app_port,
        ));
    }
    config
}

/// The client side's configuration: accept plaintext on the client pod's loopback, open TLS
/// to the server side.
pub fn client_config(
    server_ip: Ipv4Addr,
    services: &[Service],
    ca_file: &Path,
    creds: &Credentials,
    log: &Path,
) -> String {
    let mut config = format!("client = yes\n{}", common(ca_file, creds, log));
    for service in services {
        config.push_str(&format!(
            "\n[{name}]\naccept = 127.0.0.1:{local}\nconnect = {server_ip}:{tunnel}\n",
            name = service.name,
            local = service.local_port(),
            tunnel = service.tunnel_port(),
        ));
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_pin_tls13_and_mutual_verification() {
        let creds = Credentials {
            cert: "/c.pem".into(),
            key: "/k.pem".into(),
        };
        let services = [Service {
            name: "echo",
            app_port: 7000,
        }];
        let ip = Ipv4Addr::new(198, 19, 2, 10);
        let server = server_config(ip, &services, Path::new("/ca.pem"), &creds, Path::new("/l"));
        assert!(server.contains("accept = 198.19.2.10:17000\nconnect = 127.0.0.1:7000"));
        assert!(server.contains("sslVersionMin = TLSv1.3\nsslVersionMax = TLSv1.3"));
        assert!(server.contains("verifyChain = yes\nrequireCert = yes"));
        assert!(!server.contains("client = yes"));
        let client = client_config(ip, &services, Path::new("/ca.pem"), &creds, Path::new("/l"));
        assert!(client.starts_with("client = yes\n"));
        assert!(client.contains("accept = 127.0.0.1:27000\nconnect = 198.19.2.10:17000"));
    }
}
