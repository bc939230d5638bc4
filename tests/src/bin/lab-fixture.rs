//! Test servers and clients that run inside lab pods: an HTTP "position tracker", a byte sink
//! that answers with a checksum after the caller half-closes, and clients that check them.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use interceptor_tests::pattern;
use sha2::{Digest, Sha256};

/// Lab test fixtures.
#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Fixture,
}

#[derive(Subcommand)]
enum Fixture {
    /// HTTP server: GET /vehicles/, GET /download/N, POST /upload, GET /requests.
    Http {
        /// Port to listen on (all addresses).
        #[arg(long)]
        port: u16,
    },
    /// Reads each connection to EOF, then answers "<bytes> <sha256>\n" and closes.
    Sink {
        /// Port to listen on (all addresses).
        #[arg(long)]
        port: u16,
    },
    /// Sends pattern bytes, half-closes, prints the answer.
    Send {
        /// Destination.
        #[arg(long)]
        to: SocketAddr,
        /// How many bytes.
        #[arg(long)]
        bytes: u64,
        /// Pattern seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Pause this long after the first half, to hold the connection open.
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
    },
    /// Runs `send` on many connections at once and checks every answer.
    Many {
        /// Destination (a sink).
        #[arg(long)]
        to: SocketAddr,
        /// Concurrent connections.
        #[arg(long)]
        connections: u64,
        /// Bytes per connection.
        #[arg(long)]
        bytes: u64,
    },
    /// Connects and reads once; prints "<outcome> <milliseconds>" where outcome is refused,
    /// reset, eof, data or timeout.
    Probe {
        /// Destination.
        #[arg(long)]
        to: SocketAddr,
    },
}

const IO_TIMEOUT: Duration = Duration::from_secs(60);

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Fixture::Http { port } => serve(port, http),
        Fixture::Sink { port } => serve(port, sink),
        Fixture::Send {
            to,
            bytes,
            seed,
            pause_ms,
        } => {
            print!(
                "{}",
                send(to, bytes, seed, Duration::from_millis(pause_ms))?
            );
            Ok(())
        }
        Fixture::Many {
            to,
            connections,
            bytes,
        } => many(to, connections, bytes),
        Fixture::Probe { to } => {
            let started = Instant::now();
            let outcome = probe(to);
            println!("{outcome} {}", started.elapsed().as_millis());
            Ok(())
        }
    }
}

fn serve(port: u16, handler: fn(TcpStream) -> io::Result<()>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    println!("listening on {port}");
    io::stdout().flush()?;
    for stream in listener.incoming() {
        let stream = stream?;
        std::thread::spawn(move || {
            let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
            let _ = handler(stream);
        });
    }
    Ok(())
}

static REQUESTS: AtomicU64 = AtomicU64::new(0);

fn http(stream: TcpStream) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut content_length = 0u64;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            content_length = value.trim().parse().unwrap_or(0);
        }
    }
    let served = REQUESTS.fetch_add(1, Ordering::SeqCst) + 1;
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut out = stream;
    match (method, path) {
        ("GET", "/vehicles/") => respond(&mut out, "application/json", VEHICLES.as_bytes()),
        ("GET", "/requests") => respond(&mut out, "text/plain", served.to_string().as_bytes()),
        ("POST", "/upload") => {
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 256 * 1024];
            let mut left = content_length;
            while left > 0 {
                let want = buf.len().min(left as usize);
                let n = reader.read(&mut buf[..want])?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                left -= n as u64;
            }
            let body = format!(
                "{{\"bytes\":{},\"sha256\":\"{}\"}}",
                content_length - left,
                pattern::hex(&hasher.finalize())
            );
            respond(&mut out, "application/json", body.as_bytes())
        }
        ("GET", path) if path.starts_with("/download/") => {
            let len: u64 = path["/download/".len()..].parse().unwrap_or(0);
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
            )?;
            let mut buf = vec![0u8; 256 * 1024];
            let mut offset = 0;
            while offset < len {
                let n = buf.len().min((len - offset) as usize);
                pattern::fill(1, offset, &mut buf[..n]);
                out.write_all(&buf[..n])?;
                offset += n as u64;
            }
            Ok(())
        }
        _ => out
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    }
}

const VEHICLES: &str = r#"[{"id":1,"name":"Vehicle 1","lat":51.5072,"lon":-0.1276},{"id":2,"name":"Vehicle 2","lat":48.8566,"lon":2.3522}]"#;

fn respond(out: &mut TcpStream, content_type: &str, body: &[u8]) -> io::Result<()> {
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    out.write_all(body)
}

fn sink(mut stream: TcpStream) -> io::Result<()> {
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    // The caller has half-closed; it must still get this answer.
    writeln!(stream, "{total} {}", pattern::hex(&hasher.finalize()))?;
    stream.shutdown(Shutdown::Write)
}

fn send(to: SocketAddr, bytes: u64, seed: u64, pause: Duration) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut offset = 0;
    let mut paused = pause.is_zero();
    while offset < bytes {
        if !paused && offset >= bytes / 2 {
            std::thread::sleep(pause);
            paused = true;
        }
        let n = buf.len().min((bytes - offset) as usize);
        pattern::fill(seed, offset, &mut buf[..n]);
        stream.write_all(&buf[..n])?;
        offset += n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

fn many(to: SocketAddr, connections: u64, bytes: u64) -> anyhow::Result<()> {
    let handles: Vec<_> = (0..connections)
        .map(|i| {
            std::thread::spawn(move || -> Result<(), String> {
                let seed = 1000 + i;
                let answer = send(to, bytes, seed, Duration::ZERO)
                    .map_err(|e| format!("connection {i}: {e}"))?;
                let expected = format!("{bytes} {}\n", pattern::sha256_hex(seed, bytes));
                if answer == expected {
                    Ok(())
                } else {
                    Err(format!(
                        "connection {i}: answer {answer:?}, expected {expected:?}"
                    ))
                }
            })
        })
        .collect();
    let failures: Vec<String> = handles
        .into_iter()
        .filter_map(|h| {
            h.join()
                .unwrap_or_else(|_| Err("thread panicked".into()))
                .err()
        })
        .collect();
    if failures.is_empty() {
        println!("ok {connections}");
        Ok(())
    } else {
        anyhow::bail!(
            "{} of {connections} failed: {}",
            failures.len(),
            failures.join("; ")
        )
    }
}

fn probe(to: SocketAddr) -> &'static str {
    let mut stream = match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
        Ok(stream) => stream,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return "refused",
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return "reset",
        Err(_) => return "timeout",
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = stream.write_all(b"GET /vehicles/ HTTP/1.1\r\nHost: probe\r\n\r\n");
    let mut buf = [0u8; 1];
    match stream.read(&mut buf) {
        Ok(0) => "eof",
        Ok(_) => "data",
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => "reset",
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => "refused",
        Err(_) => "timeout",
    }
}
