//! rustls configurations for the agent-to-agent tunnel.
//!
//! Both ends present [`WorkloadCert`]s issued by the mesh CA, over TLS 1.3 only
//! (ALPN [`ALPN_PROTOCOL`]), with the *ring* crypto provider.
//!
//! # Who checks what
//!
//! - **Server side** ([`server_config`]): the client must present a certificate
//!   chaining to the mesh CA (rustls' [`WebPkiClientVerifier`], which also
//!   requires the clientAuth EKU), and the verifier wrapping it then requires
//!   the leaf's SPIFFE id to belong to the bundle's trust domain. Both checks run
//!   inside the handshake, so a foreign client never completes it.
//! - **Client side** ([`client_config`]): one `ClientConfig` per *source*
//!   workload, reused for every connection so TLS session tickets can be
//!   resumed. The destination identity to expect is encoded, per connection, in
//!   the TLS server name: [`server_name_for`] maps an identity to
//!   `<sha256(id)[..16] hex>.<sha256(id)[16..] hex>.id.interceptor.invalid`.
//!   The verifier checks the chain to the mesh CA with webpki (serverAuth EKU,
//!   validity; DNS names are ignored), then recomputes the server name from the
//!   leaf's single URI SAN and requires it to equal the one being connected to.
//!   The hash makes the name fixed-length and always a valid DNS name whatever
//!   the identity; SHA-256 makes finding another identity with the same name
//!   infeasible, so "server name matches" means "exactly the expected identity".
//!
//! # Session resumption
//!
//! Resumption skips certificate verification, so it is only sound because the
//! rustls client session cache is keyed by server name, and here the server
//! name *is* the expected identity: a ticket obtained from a server verified as
//! identity X can only be used for a later connection that expects X. Do not
//! share one resumption store between configs of different source workloads:
//! the server takes the client identity of a resumed session from the ticket.
//! Tickets live up to the ticketer's lifetime (hours), possibly beyond the peer
//! certificate's expiry; [`connect`] and [`accept`] therefore also reject a
//! peer whose leaf is no longer within its validity period. The agent renews
//! certificates at half-life with new configurations (new session cache, new
//! ticketer), so sessions never outlive the certificates they were made with.
//!
//! The SNI extension is sent (it reveals only a hash of the destination
//! identity, which the destination address reveals anyway) so that a future
//! multi-workload server can select its certificate by it.

use std::io;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{
    CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
};
use rustls::pki_types::{CertificateDer, DnsName, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, VerifierBuilderError, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use crate::identity::{Identity, IdentityError, TrustBundle, WorkloadCert};

/// ALPN protocol id both ends require: HTTP/2, which HBONE tunnels speak
/// ([`crate::proxy::hbone`]).
pub const ALPN_PROTOCOL: &[u8] = b"h2";
/// DNS suffix of the server names produced by [`server_name_for`]
/// (`.invalid` is reserved and never resolves).
pub const SERVER_NAME_SUFFIX: &str = "id.interceptor.invalid";
/// TLS 1.3 session tickets a server sends after each handshake; every
/// resumption consumes one, and a resumed handshake brings fresh ones.
pub const TICKETS_PER_HANDSHAKE: usize = 4;
/// Destinations (server names) whose session tickets a client config keeps.
pub const CLIENT_SESSION_CACHE_SIZE: usize = 4096;

/// Errors of TLS configuration, handshakes and peer identification.
///
/// Messages include the underlying cause (e.g. the rustls error behind a
/// failed handshake), so `{}` alone gives the whole story; the causes are kept
/// as fields rather than [`std::error::Error::source`] so chains printed by
/// anyhow do not repeat them.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls rejected the configuration (protocol versions, certificate or key).
    #[error("building TLS configuration: {0}")]
    Config(rustls::Error),

    /// The client certificate verifier could not be built from the trust bundle.
    #[error("building client certificate verifier from the trust bundle: {0}")]
    ClientVerifier(VerifierBuilderError),

    /// The handshake as client failed (I/O, or a rustls error such as the
    /// server presenting another identity).
    #[error("TLS handshake to {expected} failed: {cause}")]
    ClientHandshake {
        /// The identity the server was expected to present.
        expected: Identity,
        /// The I/O error, wrapping the rustls error if any.
        cause: io::Error,
    },

    /// The handshake as server failed (I/O, or a rustls error such as an
    /// untrusted client certificate).
    #[error("TLS handshake from client failed: {cause}")]
    ServerHandshake {
        /// The I/O error, wrapping the rustls error if any.
        cause: io::Error,
    },

    /// The peer presented no certificate (or the handshake is not finished).
    #[error("peer presented no certificate")]
    NoPeerCertificate,

    /// The peer's leaf certificate carries no valid SPIFFE identity.
    #[error("peer certificate has no valid SPIFFE identity: {0}")]
    PeerIdentity(IdentityError),

    /// The peer is authenticated, but as someone else than expected.
    #[error("peer is {presented}, expected {expected}")]
    UnexpectedPeer {
        /// The identity that was expected.
        expected: Box<Identity>,
        /// The identity the peer's certificate carries.
        presented: Box<Identity>,
    },

    /// The peer's leaf certificate is outside its validity period (possible
    /// on a resumed session that outlived the certificate).
    #[error("certificate of peer {identity} is not valid now")]
    PeerCertificateNotCurrent {
        /// The peer's identity.
        identity: Identity,
    },
}

impl From<rustls::Error> for TlsError {
    fn from(error: rustls::Error) -> TlsError {
        TlsError::Config(error)
    }
}

impl From<VerifierBuilderError> for TlsError {
    fn from(error: VerifierBuilderError) -> TlsError {
        TlsError::ClientVerifier(error)
    }
}

impl From<IdentityError> for TlsError {
    fn from(error: IdentityError) -> TlsError {
        TlsError::PeerIdentity(error)
    }
}

/// The TLS server name under which a client connects to `identity`, and which
/// the client verifier (see the [module docs](self)) requires the server's
/// certificate to match.
pub fn server_name_for(identity: &Identity) -> ServerName<'static> {
    let digest = sha256(identity.to_string().as_bytes());
    let hex: String = digest
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let (first, second) = hex.split_at(hex.len() / 2);
    let name = format!("{first}.{second}.{SERVER_NAME_SUFFIX}");
    let name =
        DnsName::try_from(name).expect("two hex labels under a fixed suffix are a valid DNS name");
    ServerName::DnsName(name)
}

/// A server configuration presenting `cert` and requiring clients of the
/// bundle's trust domain, with a fresh session ticketer. A renewed certificate
/// gets a new configuration, and so a new ticketer: sessions that carry the old
/// certificates cannot resume past the renewal.
pub fn server_config(
    bundle: &TrustBundle,
    cert: &WorkloadCert,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(mesh_provider());
    let verifier = MeshClientVerifier::new(bundle, Arc::clone(&provider))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    config.send_tls13_tickets = TICKETS_PER_HANDSHAKE;
    Ok(Arc::new(config))
}

/// A client configuration presenting `cert`, for all connections of that
/// source workload: the destination identity is chosen per connection through
/// [`server_name_for`] (or simply by [`connect`]).
pub fn client_config(
    bundle: &TrustBundle,
    cert: &WorkloadCert,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(mesh_provider());
    let verifier = MeshServerVerifier {
        roots: bundle.root_store(),
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    config.resumption = Resumption::in_memory_sessions(CLIENT_SESSION_CACHE_SIZE);
    Ok(Arc::new(config))
}

/// ring's provider with AES-128-GCM/SHA-256 first: the handshake hash then uses SHA-256,
/// which has hardware support on common CPUs, where SHA-384 runs in software.
fn mesh_provider() -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    provider
}

/// A workload's client and server configurations, replaced together when its
/// certificate is renewed; connections in flight keep the ones they started with.
/// Each renewal starts a new generation, so pooled tunnels made with an older
/// certificate can be retired.
#[derive(Debug)]
pub struct PodTls {
    configs: RwLock<Configs>,
}

#[derive(Debug)]
struct Configs {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    generation: u64,
}

impl PodTls {
    /// Configurations presenting `cert`.
    pub fn new(bundle: &TrustBundle, cert: &WorkloadCert) -> Result<PodTls, TlsError> {
        Ok(PodTls {
            configs: RwLock::new(Self::build(bundle, cert, 0)?),
        })
    }

    /// Presents `cert` from the next connection on, with fresh session state,
    /// as the next generation.
    pub fn renew(&self, bundle: &TrustBundle, cert: &WorkloadCert) -> Result<(), TlsError> {
        let mut configs = crate::sync::write(&self.configs);
        *configs = Self::build(bundle, cert, configs.generation + 1)?;
        Ok(())
    }

    /// The client configuration for a new outbound connection, with its generation.
    pub fn client(&self) -> (Arc<ClientConfig>, u64) {
        let configs = crate::sync::read(&self.configs);
        (Arc::clone(&configs.client), configs.generation)
    }

    /// The server configuration for a new inbound connection.
    pub fn server(&self) -> Arc<ServerConfig> {
        Arc::clone(&crate::sync::read(&self.configs).server)
    }

    /// The current generation: 0, then one more at each renewal.
    pub fn generation(&self) -> u64 {
        crate::sync::read(&self.configs).generation
    }

    fn build(
        bundle: &TrustBundle,
        cert: &WorkloadCert,
        generation: u64,
    ) -> Result<Configs, TlsError> {
        Ok(Configs {
            client: client_config(bundle, cert)?,
            server: server_config(bundle, cert)?,
            generation,
        })
    }
}

/// The SPIFFE identity in the peer's leaf certificate, once the handshake is
/// done. Also works on resumed sessions (rustls restores the peer's
/// certificates from the session). Pass a `ClientConnection` or
/// `ServerConnection`; they dereference to [`CommonState`].
pub fn peer_identity(state: &CommonState) -> Result<Identity, TlsError> {
    Ok(Identity::from_certificate(peer_leaf(state)?)?)
}

/// The serial number of the peer's leaf certificate, once the handshake is done (see
/// [`crate::identity::certificate_serial`]).
pub fn peer_certificate_serial(state: &CommonState) -> Result<String, TlsError> {
    Ok(crate::identity::certificate_serial(peer_leaf(state)?)?)
}

/// Connects to a server expected to be `expected`, returning the stream and
/// the (verified) server identity.
pub async fn connect<IO>(
    config: Arc<ClientConfig>,
    expected: &Identity,
    stream: IO,
) -> Result<(client::TlsStream<IO>, Identity), TlsError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let tls = TlsConnector::from(config)
        .connect(server_name_for(expected), stream)
        .await
        .map_err(|cause| TlsError::ClientHandshake {
            expected: expected.clone(),
            cause,
        })?;
    let presented = verified_peer(tls.get_ref().1)?;
    if presented != *expected {
        return Err(TlsError::UnexpectedPeer {
            expected: Box::new(expected.clone()),
            presented: Box::new(presented),
        });
    }
    Ok((tls, presented))
}

/// Accepts a client, returning the stream and the client's identity (already
/// verified to chain to the mesh CA and belong to the trust domain).
pub async fn accept<IO>(
    config: Arc<ServerConfig>,
    stream: IO,
) -> Result<(server::TlsStream<IO>, Identity), TlsError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let tls = TlsAcceptor::from(config)
        .accept(stream)
        .await
        .map_err(|cause| TlsError::ServerHandshake { cause })?;
    let client = verified_peer(tls.get_ref().1)?;
    Ok((tls, client))
}

/// The peer identity, after checking that its leaf is still within its
/// validity period (a resumed session may have outlived it).
fn verified_peer(state: &CommonState) -> Result<Identity, TlsError> {
    let identity = peer_identity(state)?;
    let leaf = x509_parser::parse_x509_certificate(peer_leaf(state)?)
        .map_err(|e| IdentityError::InvalidCertificate {
            what: "peer",
            reason: e.to_string(),
        })?
        .1;
    if !leaf.validity().is_valid() {
        return Err(TlsError::PeerCertificateNotCurrent { identity });
    }
    Ok(identity)
}

fn peer_leaf(state: &CommonState) -> Result<&CertificateDer<'static>, TlsError> {
    state
        .peer_certificates()
        .and_then(<[_]>::first)
        .ok_or(TlsError::NoPeerCertificate)
}

fn sha256(bytes: &[u8]) -> rustls::crypto::hash::Output {
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .expect("TLS13_AES_128_GCM_SHA256 is a TLS 1.3 suite");
    suite.common.hash_provider.hash(bytes)
}

/// Client-side verifier: chain to the mesh CA, and a leaf whose identity maps
/// to the server name being connected to.
#[derive(Debug)]
struct MeshServerVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let presented = Identity::from_certificate(end_entity).map_err(certificate_error)?;
        if server_name_for(&presented) != *server_name {
            return Err(CertificateError::NotValidForNameContext {
                expected: server_name.to_owned(),
                presented: vec![presented.to_string()],
            }
            .into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Server-side verifier: webpki chain to the mesh CA, then a leaf identity in
/// the bundle's trust domain.
#[derive(Debug)]
struct MeshClientVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl MeshClientVerifier {
    fn new(
        bundle: &TrustBundle,
        provider: Arc<CryptoProvider>,
    ) -> Result<MeshClientVerifier, TlsError> {
        let chain =
            WebPkiClientVerifier::builder_with_provider(bundle.root_store(), provider).build()?;
        Ok(MeshClientVerifier {
            chain,
            trust_domain: bundle.trust_domain().to_owned(),
        })
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)?;
        let presented = Identity::from_certificate(end_entity).map_err(certificate_error)?;
        if presented.trust_domain() != self.trust_domain {
            return Err(certificate_error(IdentityError::ForeignTrustDomain {
                identity: presented.to_string(),
                trust_domain: self.trust_domain.clone(),
            }));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// A certificate rejection carrying our explanation (sent as a bad_certificate
/// alert, reported locally with the message).
fn certificate_error(error: IdentityError) -> rustls::Error {
    CertificateError::Other(OtherError(Arc::new(error))).into()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::HandshakeKind;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::identity::Ca;

    type ServerSide = Result<(server::TlsStream<TcpStream>, Identity), TlsError>;
    type ClientSide = Result<(client::TlsStream<TcpStream>, Identity), TlsError>;

    const TRUST_DOMAIN: &str = "mesh.test";
    const VALIDITY: Duration = Duration::from_secs(3600);

    fn identity(trust_domain: &str, service_account: &str) -> Identity {
        Identity::new(trust_domain, "shop", service_account).unwrap()
    }

    fn issue(ca: &Ca, service_account: &str) -> (Identity, WorkloadCert) {
        let id = identity(ca.trust_domain(), service_account);
        let cert = ca.issue(&id, VALIDITY).unwrap();
        (id, cert)
    }

    fn server_tls(ca: &Ca, cert: &WorkloadCert) -> Arc<ServerConfig> {
        server_config(ca.trust_bundle(), cert).unwrap()
    }

    fn client_tls(ca: &Ca, cert: &WorkloadCert) -> Arc<ClientConfig> {
        client_config(ca.trust_bundle(), cert).unwrap()
    }

    /// One TLS connection over real loopback TCP; both sides' outcomes.
    async fn handshake(
        server_tls: &Arc<ServerConfig>,
        client_tls: &Arc<ClientConfig>,
        expected: &Identity,
    ) -> (ServerSide, ClientSide) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server_tls = Arc::clone(server_tls);
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            accept(server_tls, tcp).await
        });
        let tcp = TcpStream::connect(address).await.unwrap();
        let client = connect(Arc::clone(client_tls), expected, tcp).await;
        let server = tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("server side hung")
            .unwrap();
        (server, client)
    }

    /// Client sends a ping, server answers: data flows both ways.
    async fn exchange(
        server: &mut server::TlsStream<TcpStream>,
        client: &mut client::TlsStream<TcpStream>,
    ) {
        client.write_all(b"ping").await.unwrap();
        client.flush().await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").await.unwrap();
        server.flush().await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    }

    /// In TLS 1.3 the client finishes its handshake before the server checks
    /// the client certificate, so a rejection may surface on the first read.
    async fn assert_client_fails(client: ClientSide) {
        if let Ok((mut stream, _)) = client {
            let mut buf = [0u8; 1];
            let read = stream.read(&mut buf).await;
            assert!(read.is_err(), "client read after rejection gave {read:?}");
        }
    }

    /// A rogue CA of the same trust domain has the same subject name as the
    /// mesh CA, so webpki takes the mesh root as issuer and the signature fails.
    fn assert_rejected_as_rogue(error: &TlsError) {
        let expected = rustls::Error::InvalidCertificate(CertificateError::BadSignature);
        assert_eq!(rustls_error(error), &expected, "{error:?}");
    }

    fn rustls_error(error: &TlsError) -> &rustls::Error {
        let cause = match error {
            TlsError::ClientHandshake { cause, .. } | TlsError::ServerHandshake { cause } => cause,
            other => panic!("not a handshake error: {other:?}"),
        };
        cause
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .unwrap_or_else(|| panic!("no rustls error in {cause:?}"))
    }

    #[tokio::test]
    async fn mutual_tls_exchanges_data_and_both_sides_see_peer_identity() {
        let ca = Ca::generate(TRUST_DOMAIN).unwrap();
        let (server_id, server_cert) = issue(&ca, "payments");
        let (client_id, client_cert) = issue(&ca, "checkout");
        let (server, client) = handshake(
            &server_tls(&ca, &server_cert),
            &client_tls(&ca, &client_cert),
            &server_id,
        )
        .await;
        let (mut server, seen_client) = server.unwrap();
        let (mut client, seen_server) = client.unwrap();
        assert_eq!(seen_client, client_id);
        assert_eq!(seen_server, server_id);
        assert_eq!(peer_identity(server.get_ref().1).unwrap(), client_id);
        assert_eq!(peer_identity(client.get_ref().1).unwrap(), server_id);
        assert_eq!(client.get_ref().1.alpn_protocol(), Some(ALPN_PROTOCOL));
        assert_eq!(
            client.get_ref().1.handshake_kind(),
            Some(HandshakeKind::Full)
        );
        exchange(&mut server, &mut client).await;
    }

    #[tokio::test]
    async fn client_rejects_server_presenting_another_identity() {
        let ca = Ca::generate(TRUST_DOMAIN).unwrap();
        let (_, server_cert) = issue(&ca, "impostor");
        let (_, client_cert) = issue(&ca, "checkout");
        let expected = identity(TRUST_DOMAIN, "payments");
        let (server, client) = handshake(
            &server_tls(&ca, &server_cert),
            &client_tls(&ca, &client_cert),
            &expected,
        )
        .await;
        let error = client.unwrap_err();
        assert!(
            matches!(
                rustls_error(&error),
                rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { presented, .. })
                    if presented == &["spiffe://mesh.test/ns/shop/sa/impostor".to_owned()]
            ),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(
            message.contains("is only valid for spiffe://mesh.test/ns/shop/sa/impostor"),
            "{message}"
        );
        assert!(server.is_err());
    }

    #[tokio::test]
    async fn server_rejects_client_certificate_from_another_ca() {
        let ca = Ca::generate(TRUST_DOMAIN).unwrap();
        let rogue_ca = Ca::generate(TRUST_DOMAIN).unwrap();
        let (server_id, server_cert) = issue(&ca, "payments");
        let (_, rogue_cert) = issue(&rogue_ca, "checkout");
        // The rogue client trusts the real CA, so only the server can object.
        let (server, client) = handshake(
            &server_tls(&ca, &server_cert),
            &client_tls(&ca, &rogue_cert),
            &server_id,
        )
        .await;
        let error = server.unwrap_err();
        assert_rejected_as_rogue(&error);
        assert_client_fails(client).await;
    }

    #[tokio::test]
    async fn client_rejects_server_certificate_from_another_ca() {
        let ca = Ca::generate(TRUST_DOMAIN).unwrap();
        let rogue_ca = Ca::generate(TRUST_DOMAIN).unwrap();
        let (server_id, rogue_cert) = issue(&rogue_ca, "payments");
        let (_, client_cert) = issue(&ca, "checkout");
        // The rogue server trusts the real CA, so only the client can object.
        let (server, client) = handshake(
            &server_tls(&ca, &rogue_cert),
            &client_tls(&ca, &client_cert),
            &server_id,
        )
        .await;
        let error = client.unwrap_err();
        assert_rejected_as_rogue(&error);
        assert!(server.is_err());
    }

    #[tokio::test]
    async fn server_rejects_client_of_another_trust_domain_signed_by_the_mesh_ca() {
        let ca = Ca::generate(TRUST_DOMAIN).unwrap();
        let (server_id, server_cert) = issue(&ca, "payments");
        // `Ca::issue` refuses foreign trust domains; sign one directly to prove
        // the server's own check holds even if the CA misbehaved.
        let foreign = identity("other.test", "checkout");
        let foreign_cert = ca.sign_leaf(&foreign, VALIDITY).unwrap();
        let (server, client) = handshake(
            &server_tls(&ca, &server_cert),
            &client_tls(&ca, &foreign_cert),
            &server_id,
        )
        .await;
        let error = server.unwrap_err();
        let message = match rustls_error(&error) {
            rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
                other.0.to_string()
            }
            other => panic!("unexpected rejection {other:?}"),
        };
        assert!(
            message.contains("outside trust domain \"mesh.test\""),
            "{message}"
        );
        assert_client_fails(client).await;
    }

    /// A certificate signed by the mesh CA for `service_account`, with its parameters edited.
    fn crafted(
        ca: &Ca,
        service_account: &str,
        edit: impl FnOnce(&mut rcgen::CertificateParams),
    ) -> (Identity, WorkloadCert) {
        let id = identity(ca.trust_domain(), service_account);
        let cert = ca.sign_crafted(&id, edit);
        (id, cert)
    }

    fn hours_from_now(hours: i64) -> time::OffsetDateTime {
        time::OffsetDateTime::now_utc() + time::Duration::hours(hours)
    }

    /// Runs a handshake where the server presents `bad` and one where the client does, and
    /// returns the rejecting side's error text for each: (the client's, the server's). Every
    /// handshake must fail on both sides: nothing is carried.
    async fn refused_both_ways(ca: &Ca, bad: (Identity, WorkloadCert)) -> (String, String) {
        let (bad_id, bad_cert) = bad;
        let (good_id, good_cert) = issue(ca, "checkout");

        let (server, client) = handshake(
            &server_tls(ca, &bad_cert),
            &client_tls(ca, &good_cert),
            &bad_id,
        )
        .await;
        assert!(
            server.is_err(),
            "the server side of a refused handshake went on"
        );
        let by_client = format!("{}", client.unwrap_err());

        let (server, client) = handshake(
            &server_tls(ca, &good_cert),
            &client_tls(ca, &bad_cert),
            &good_id,
        )
        .await;
        let by_server = format!("{}", server.unwrap_err());
        assert_client_fails(client).await;
        (by_client, by_server)
    }

    #[tokio::test]
    async fn an_expired_certificate_is_refused_on_both_sides() {
        let ca = Ca::generate(TRUST_DOMAIN).unwrap();
        let bad = crafted(&ca, "payments", |p| {
            p.not_before = hours_from_now(-3);
            p.not_after = hours_from_now(-1);
        });
        let (by_client, by_server) = refused_both_ways(&ca, bad).await;
        for text in [by_client, by_server] {
            assert!(text.contains("certificate expired"), "{text}");
        }
    }

    #[tokio::test]
    async fn a_certificate_not_valid_yet_is_refused_on_both_sides() {
        let ca = Ca::generate(TRUST_DOMAIN).unwrap();
        let bad = crafted(&ca, "payments", |p| {
            p.not_before = hours_from_now(1);
            p.not_after = hours_from_now(3);
        });
        let (by_client, by_server) = refused_both_ways(&ca, bad).await;
        for text in [by_client, by_server] {
            assert!(text.contains("certificate not valid yet"), "{text}");
        }
    }

    #[tokio::test]
    async fn a_certificate_without_a_spiffe_id_or_with_two_is_refused_on_both_sides() {
        let ca = Ca::generate(TRUST_DOMAIN).unwrap();
        let none = crafted(&ca, "payments", |p| {
            p.subject_alt_names =
                vec![rcgen::SanType::DnsName("payments.shop".try_into().unwrap())];
        });
        let (by_client, by_server) = refused_both_ways(&ca, none).await;
        for text in [by_client, by_server] {
            assert!(text.contains("no URI subject alternative name"), "{text}");
        }

        let two = crafted(&ca, "payments", |p| {
            let other = format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/ledger");
            p.subject_alt_names
                .push(rcgen::SanType::URI(other.as_str().try_into().unwrap()));
        });
        let (by_client, by_server) = refused_both_ways(&ca, two).await;
        for text in [by_client, by_server] {
            assert!(text.contains("expected exactly one"), "{text}");
        }
    }

    #[tokio::test]
    async fn a_ca_certificate_used_as_a_leaf_is_refused_on_both_sides() {
        let ca = Ca::generate(TRUST_DOMAIN).unwrap();
        let bad = crafted(&ca, "payments", |p| {
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.key_usages.push(rcgen::KeyUsagePurpose::KeyCertSign);
        });
        let (by_client, by_server) = refused_both_ways(&ca, bad).await;
        for text in [by_client, by_server] {
            assert!(text.contains("CaUsedAsEndEntity"), "{text}");
        }
    }

    #[tokio::test]
    async fn renewed_configs_present_the_new_certificate_with_fresh_sessions() {
        let ca = Ca::generate(TRUST_DOMAIN).unwrap();
        let (server_id, first) = issue(&ca, "payments");
        let (_, client_cert) = issue(&ca, "checkout");
        let server = PodTls::new(ca.trust_bundle(), &first).unwrap();
        let client = PodTls::new(ca.trust_bundle(), &client_cert).unwrap();
        let connect_once = || async {
            let (server_side, client_side) =
                handshake(&server.server(), &client.client().0, &server_id).await;
            let (mut server_side, mut client_side) =
                (server_side.unwrap().0, client_side.unwrap().0);
            exchange(&mut server_side, &mut client_side).await;
            let conn = client_side.get_ref().1;
            (
                conn.peer_certificates().unwrap()[0].clone(),
                conn.handshake_kind(),
            )
        };
        let (leaf, _) = connect_once().await;
        assert_eq!(leaf, *first.leaf());
        assert_eq!(connect_once().await.1, Some(HandshakeKind::Resumed));

        let renewed = ca.issue(&server_id, VALIDITY).unwrap();
        server.renew(ca.trust_bundle(), &renewed).unwrap();
        client.renew(ca.trust_bundle(), &client_cert).unwrap();
        let (leaf, kind) = connect_once().await;
        assert_eq!(leaf, *renewed.leaf());
        assert_eq!(
            kind,
            Some(HandshakeKind::Full),
            "no session may outlive a renewal"
        );
    }

    #[tokio::test]
    async fn aes_128_gcm_sha256_is_negotiated() {
        let ca = Ca::generate(TRUST_DOMAIN).unwrap();
        let (server_id, server_cert) = issue(&ca, "payments");
        let (_, client_cert) = issue(&ca, "checkout");
        let (_, client) = handshake(
            &server_tls(&ca, &server_cert),
            &client_tls(&ca, &client_cert),
            &server_id,
        )
        .await;
        let suite = client
            .unwrap()
            .0
            .get_ref()
            .1
            .negotiated_cipher_suite()
            .unwrap();
        assert_eq!(suite.suite(), rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    }

    #[tokio::test]
    async fn second_connection_resumes_and_keeps_peer_identities() {
        let ca = Ca::generate(TRUST_DOMAIN).unwrap();
        let (server_id, server_cert) = issue(&ca, "payments");
        let (client_id, client_cert) = issue(&ca, "checkout");
        let server_tls = server_tls(&ca, &server_cert);
        let client_tls = client_tls(&ca, &client_cert);

        let (server, client) = handshake(&server_tls, &client_tls, &server_id).await;
        let (mut server, mut client) = (server.unwrap().0, client.unwrap().0);
        // Reading the reply makes the client process the session tickets.
        exchange(&mut server, &mut client).await;
        assert!(client.get_ref().1.tls13_tickets_received() > 0);
        drop((server, client));

        let (server, client) = handshake(&server_tls, &client_tls, &server_id).await;
        let (mut server, seen_client) = server.unwrap();
        let (mut client, seen_server) = client.unwrap();
        assert_eq!(
            client.get_ref().1.handshake_kind(),
            Some(HandshakeKind::Resumed)
        );
        assert_eq!(
            server.get_ref().1.handshake_kind(),
            Some(HandshakeKind::Resumed)
        );
        assert_eq!(seen_client, client_id);
        assert_eq!(seen_server, server_id);
        assert_eq!(peer_identity(server.get_ref().1).unwrap(), client_id);
        assert_eq!(peer_identity(client.get_ref().1).unwrap(), server_id);
        exchange(&mut server, &mut client).await;
    }

    #[tokio::test]
    async fn tickets_from_one_identity_do_not_vouch_for_another() {
        let ca = Ca::generate(TRUST_DOMAIN).unwrap();
        let (server_id, server_cert) = issue(&ca, "payments");
        let (_, client_cert) = issue(&ca, "checkout");
        let server_tls = server_tls(&ca, &server_cert);
        let client_tls = client_tls(&ca, &client_cert);
        let (server, client) = handshake(&server_tls, &client_tls, &server_id).await;
        exchange(&mut server.unwrap().0, &mut client.unwrap().0).await;

        // Same server, same client config, now expecting someone else.
        let other = identity(TRUST_DOMAIN, "ledger");
        let (_, client) = handshake(&server_tls, &client_tls, &other).await;
        let error = client.unwrap_err();
        assert!(
            matches!(
                rustls_error(&error),
                rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })
            ),
            "{error:?}"
        );
    }

    #[test]
    fn server_names_are_distinct_dns_names_per_identity() {
        let a = server_name_for(&identity(TRUST_DOMAIN, "a"));
        let b = server_name_for(&identity(TRUST_DOMAIN, "b"));
        assert_ne!(a, b);
        assert_eq!(a, server_name_for(&identity(TRUST_DOMAIN, "a")));
        let ServerName::DnsName(name) = a else {
            panic!("not a DNS name: {a:?}")
        };
        let labels: Vec<&str> = name.as_ref().split('.').collect();
        assert_eq!(labels.len(), 5);
        assert!(labels[..2].iter().all(|label| label.len() == 32));
        assert!(name.as_ref().ends_with(SERVER_NAME_SUFFIX));
    }

    #[test]
    fn peer_identity_requires_a_finished_handshake() {
        let ca = Ca::generate(TRUST_DOMAIN).unwrap();
        let (server_id, cert) = issue(&ca, "checkout");
        let config = client_config(ca.trust_bundle(), &cert).unwrap();
        let connection =
            rustls::ClientConnection::new(config, server_name_for(&server_id)).unwrap();
        assert!(matches!(
            peer_identity(&connection),
            Err(TlsError::NoPeerCertificate)
        ));
    }
}
