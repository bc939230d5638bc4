//! Test servers and clients that run inside lab pods: an HTTP "position tracker", a byte sink
//! that answers with a checksum after the caller half-closes, and clients that check them;
//! and for the benchmarks an echo server and clients measuring request/response latency, new
//! connections per second, and idle connections held open.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
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
    /// HTTP server: GET /vehicles/, GET /download/N, POST /upload, GET /requests, and
    /// GET /peer (the caller's address as the server sees it).
    Http {
        /// Port to listen on.
        #[arg(long)]
        port: u16,
        /// Address to listen on: 0.0.0.0, 127.0.0.1 or the pod's own address.
        #[arg(long, default_value = "0.0.0.0")]
        bind: Ipv4Addr,
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
    /// Sends a SYN with a forged source address (IP_TRANSPARENT), as an attacker on the path
    /// would; prints the probe outcome (normally "timeout": answers go to the real owner).
    Spoof {
        /// The forged source address.
        #[arg(long)]
        from: Ipv4Addr,
        /// Destination.
        #[arg(long)]
        to: SocketAddrV4,
    },
    /// Echo server for the benchmarks: sends back whatever it reads.
    Echo {
        /// Port to listen on (all addresses).
        #[arg(long)]
        port: u16,
        /// Serve connections on this many threads, one connection at a time each; 0 starts a
        /// thread per connection (for many long-held connections).
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// Echo exactly this many bytes, then close (the server closes first, so TIME_WAIT
        /// stays on the server and a fast client never runs out of ports).
        #[arg(long)]
        once: Option<usize>,
        /// Close a connection idle this long (milliseconds).
        #[arg(long, default_value_t = IO_TIMEOUT.as_millis() as u64)]
        idle_timeout_ms: u64,
    },
    /// Request/response latency on one held connection to an echo server; prints JSON with
    /// percentiles in microseconds.
    Rr {
        /// Destination (an echo server).
        #[arg(long)]
        to: SocketAddr,
        /// Message size in bytes, each way.
        #[arg(long)]
        size: usize,
        /// Measured round trips (at most).
        #[arg(long)]
        count: usize,
        /// Unmeasured round trips first.
        #[arg(long, default_value_t = 1000)]
        warmup: usize,
        /// Stop after this many milliseconds even if `count` is not reached.
        #[arg(long, default_value_t = 10_000)]
        max_ms: u64,
    },
    /// New connections per second: each connection sends one request to an `echo --once`
    /// server, reads the answer and the server's close. Prints JSON.
    ConnRate {
        /// Destination (an `echo --once <size>` server).
        #[arg(long)]
        to: SocketAddr,
        /// Request and response size.
        #[arg(long)]
        size: usize,
        /// Client threads, each with one connection at a time.
        #[arg(long)]
        threads: usize,
        /// Run this many milliseconds (at most).
        #[arg(long)]
        duration_ms: u64,
        /// Stop after this many connections in all (at most).
        #[arg(long)]
        max: u64,
    },
    /// Opens connections and sends nothing (or a payload once, or a byte every interval), as
    /// an attacker at a tunnel port would, then watches how the server ends them. Prints JSON:
    /// how many connected, were reset, got EOF or stayed open, and after how long.
    Idle {
        /// Destination.
        #[arg(long)]
        to: SocketAddr,
        /// How many connections.
        #[arg(long)]
        connections: usize,
        /// Send this once right after connecting.
        #[arg(long)]
        payload: Option<String>,
        /// Send one byte this often (a slow handshake).
        #[arg(long)]
        trickle_ms: Option<u64>,
        /// Watch this many milliseconds after the last connect (at most).
        #[arg(long)]
        watch_ms: u64,
        /// Give up connecting after this many milliseconds in all.
        #[arg(long, default_value_t = 60_000)]
        max_connect_ms: u64,
    },
    /// Opens connections to an echo server from several threads, each checked with a
    /// one-byte round trip, and counts how each ended: ok, refused, reset, eof or timeout
    /// (5 s). Good connections are held until all attempts are done. Prints JSON.
    Attempt {
        /// Destination (an echo server that serves a thread per connection).
        #[arg(long)]
        to: SocketAddr,
        /// How many connections.
        #[arg(long)]
        connections: usize,
        /// Client threads.
        #[arg(long, default_value_t = 8)]
        threads: usize,
    },
    /// Steady load: starts `rate` new connections per second for `duration_ms`, each a
    /// `probe` (GET /vehicles/, one read) with `timeout_ms` for the connect and the read, and
    /// prints one JSON line per connection: when it started (ms from the start), its outcome
    /// and how long it took.
    Steady {
        /// Destination (an `http` server).
        #[arg(long)]
        to: SocketAddr,
        /// New connections per second (at most 1000).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1000))]
        rate: u64,
        /// How long to keep starting connections (at most 60 s).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=60_000))]
        duration_ms: u64,
        /// Connect and read timeout of each connection.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
    /// Opens connections to an echo server, checks each with a one-byte round trip, prints
    /// "ready <n>", and holds them until stdin closes or the time limit passes. Each line
    /// `check` on stdin makes it try one more round trip on every held connection (1 s read
    /// timeout) and print JSON: how many answered (`ok`) or ended (`reset`, `eof`, `timeout`),
    /// and the slowest in milliseconds.
    Hold {
        /// Destination (an echo server that serves a thread per connection).
        #[arg(long)]
        to: SocketAddr,
        /// How many connections.
        #[arg(long)]
        connections: usize,
        /// Hold at most this many milliseconds.
        #[arg(long)]
        max_ms: u64,
        /// Count failed connections instead of stopping at the first, and print
        /// "ready <JSON>": attempted, answered, failed, first_error and closed_while_idle
        /// (held connections the other side had closed or reset when all were open).
        #[arg(long)]
        count_failures: bool,
    },
}

const IO_TIMEOUT: Duration = Duration::from_secs(60);

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Fixture::Http { port, bind } => serve(bind, port, http),
        Fixture::Sink { port } => serve(Ipv4Addr::UNSPECIFIED, port, sink),
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
        Fixture::Spoof { from, to } => {
            println!("{}", spoof(from, to)?);
            Ok(())
        }
        Fixture::Echo {
            port,
            workers,
            once,
            idle_timeout_ms,
        } => echo_server(port, workers, once, Duration::from_millis(idle_timeout_ms)),
        Fixture::Rr {
            to,
            size,
            count,
            warmup,
            max_ms,
        } => rr(to, size, count, warmup, Duration::from_millis(max_ms)),
        Fixture::ConnRate {
            to,
            size,
            threads,
            duration_ms,
            max,
        } => conn_rate(to, size, threads, Duration::from_millis(duration_ms), max),
        Fixture::Hold {
            to,
            connections,
            max_ms,
            count_failures: false,
        } => hold(to, connections, Duration::from_millis(max_ms)),
        Fixture::Hold {
            to,
            connections,
            max_ms,
            count_failures: true,
        } => hold_counted(to, connections, Duration::from_millis(max_ms)),
        Fixture::Steady {
            to,
            rate,
            duration_ms,
            timeout_ms,
        } => {
            steady(
                to,
                rate,
                Duration::from_millis(duration_ms),
                Duration::from_millis(timeout_ms),
            );
            Ok(())
        }
        Fixture::Idle {
            to,
            connections,
            payload,
            trickle_ms,
            watch_ms,
            max_connect_ms,
        } => idle(
            to,
            connections,
            payload.as_deref().unwrap_or("").as_bytes(),
            trickle_ms.map(Duration::from_millis),
            Duration::from_millis(watch_ms),
            Duration::from_millis(max_connect_ms),
        ),
        Fixture::Attempt {
            to,
            connections,
            threads,
        } => attempt(to, connections, threads),
    }
}

fn serve(
    bind: Ipv4Addr,
    port: u16,
    handler: fn(TcpStream) -> io::Result<()>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind((bind, port))?;
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
        ("GET", "/peer") => {
            let peer = out.peer_addr()?.to_string();
            respond(&mut out, "text/plain", peer.as_bytes())
        }
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
    probe_within(to, Duration::from_secs(5), Duration::from_secs(3))
}

/// [`probe`] with its connect and read timeouts.
fn probe_within(to: SocketAddr, connect: Duration, read: Duration) -> &'static str {
    let mut stream = match TcpStream::connect_timeout(&to, connect) {
        Ok(stream) => stream,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return "refused",
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return "reset",
        Err(_) => return "timeout",
    };
    let _ = stream.set_read_timeout(Some(read));
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

fn steady(to: SocketAddr, rate: u64, duration: Duration, timeout: Duration) {
    let start = Instant::now();
    let interval = Duration::from_micros(1_000_000 / rate);
    let mut clients = Vec::new();
    for n in 0.. {
        let due = interval * n;
        if due >= duration {
            break;
        }
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        clients.push(std::thread::spawn(move || {
            let began = Instant::now();
            let outcome = probe_within(to, timeout, timeout);
            (
                began.duration_since(start).as_millis(),
                outcome,
                began.elapsed().as_millis(),
            )
        }));
    }
    for client in clients {
        if let Ok((at, outcome, ms)) = client.join() {
            println!("{{\"at_ms\":{at},\"outcome\":\"{outcome}\",\"ms\":{ms}}}");
        }
    }
}

fn spoof(from: Ipv4Addr, to: SocketAddrV4) -> anyhow::Result<&'static str> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    // Binding a foreign address needs IP_TRANSPARENT (root in this namespace).
    socket.set_ip_transparent_v4(true)?;
    socket.bind(&SockAddr::from(SocketAddrV4::new(from, 0)))?;
    Ok(
        match socket.connect_timeout(&SockAddr::from(to), Duration::from_secs(1)) {
            Ok(()) => "connected",
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => "refused",
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => "reset",
            Err(_) => "timeout",
        },
    )
}

fn echo_server(
    port: u16,
    workers: usize,
    once: Option<usize>,
    idle_timeout: Duration,
) -> anyhow::Result<()> {
    raise_fd_limit();
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    println!("listening on {port}");
    io::stdout().flush()?;
    let handle = move |stream: TcpStream| {
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(idle_timeout));
        let _ = match once {
            Some(size) => echo_once(stream, size),
            None => echo(stream),
        };
    };
    if workers == 0 {
        for stream in listener.incoming() {
            let stream = stream?;
            std::thread::spawn(move || handle(stream));
        }
        return Ok(());
    }
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let listener = listener.try_clone()?;
            Ok(std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    handle(stream);
                }
            }))
        })
        .collect::<io::Result<_>>()?;
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

fn echo(mut stream: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}

fn echo_once(mut stream: TcpStream, size: usize) -> io::Result<()> {
    let mut buf = vec![0u8; size];
    stream.read_exact(&mut buf)?;
    stream.write_all(&buf)?;
    // Dropping the stream closes it: the server sends the first FIN.
    Ok(())
}

/// Connects with the benchmark's socket options.
fn bench_connect(to: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(stream)
}

fn round_trip(stream: &mut TcpStream, out: &[u8], back: &mut [u8]) -> io::Result<()> {
    stream.write_all(out)?;
    stream.read_exact(back)
}

fn rr(
    to: SocketAddr,
    size: usize,
    count: usize,
    warmup: usize,
    max: Duration,
) -> anyhow::Result<()> {
    anyhow::ensure!(size > 0, "--size must be at least 1");
    let mut stream = bench_connect(to)?;
    let out = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let started = Instant::now();
    for _ in 0..warmup {
        if started.elapsed() > max / 4 {
            break;
        }
        round_trip(&mut stream, &out, &mut back)?;
    }
    let mut samples: Vec<u64> = Vec::with_capacity(count);
    let measuring = Instant::now();
    while samples.len() < count && started.elapsed() < max {
        let t = Instant::now();
        round_trip(&mut stream, &out, &mut back)?;
        samples.push(t.elapsed().as_nanos() as u64);
    }
    let elapsed = measuring.elapsed().as_secs_f64();
    anyhow::ensure!(!samples.is_empty(), "no round trip finished in time");
    anyhow::ensure!(back == out, "echo returned different bytes");
    samples.sort_unstable();
    let pct = |p: f64| {
        let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
        samples[rank.clamp(1, samples.len()) - 1] as f64 / 1000.0
    };
    let mean = samples.iter().sum::<u64>() as f64 / samples.len() as f64 / 1000.0;
    println!(
        "{{\"samples\":{},\"secs\":{elapsed:.3},\"min_us\":{:.2},\"p50_us\":{:.2},\"p90_us\":{:.2},\"p99_us\":{:.2},\"max_us\":{:.2},\"mean_us\":{mean:.2}}}",
        samples.len(),
        pct(0.0),
        pct(50.0),
        pct(90.0),
        pct(99.0),
        pct(100.0),
    );
    Ok(())
}

fn conn_rate(
    to: SocketAddr,
    size: usize,
    threads: usize,
    duration: Duration,
    max: u64,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        size > 0 && threads > 0,
        "--size and --threads must be positive"
    );
    let done = std::sync::Arc::new(AtomicU64::new(0));
    let errors = std::sync::Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (done, errors) = (done.clone(), errors.clone());
            std::thread::spawn(move || -> (Vec<u64>, Option<String>) {
                let out = vec![0x42u8; size];
                let mut back = vec![0u8; size];
                let mut rest = [0u8; 1];
                let mut last_error = None;
                let mut times = Vec::new();
                while Instant::now() < deadline && done.load(Ordering::Relaxed) < max {
                    let started = Instant::now();
                    let result = bench_connect(to).and_then(|mut stream| {
                        round_trip(&mut stream, &out, &mut back)?;
                        // Wait for the server's close, so the server holds TIME_WAIT.
                        match stream.read(&mut rest)? {
                            0 => Ok(()),
                            _ => Err(io::Error::other("server sent more than the answer")),
                        }
                    });
                    match result {
                        Ok(()) => {
                            done.fetch_add(1, Ordering::Relaxed);
                            times.push(started.elapsed().as_nanos() as u64);
                        }
                        Err(e) => {
                            last_error = Some(e.to_string());
                            // Many failures mean the path is broken: stop early.
                            if errors.fetch_add(1, Ordering::Relaxed) >= 100 {
                                break;
                            }
                        }
                    }
                }
                (times, last_error)
            })
        })
        .collect();
    let mut times = Vec::new();
    let mut last_error = None;
    for worker in workers {
        if let Ok((mut worker_times, error)) = worker.join() {
            times.append(&mut worker_times);
            last_error = error.or(last_error);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (done, errors) = (done.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
    times.sort_unstable();
    let pct = |p: f64| {
        let rank = ((p / 100.0) * times.len() as f64).ceil() as usize;
        times
            .get(rank.clamp(1, times.len().max(1)) - 1)
            .map_or(0.0, |&t| t as f64 / 1000.0)
    };
    println!(
        "{{\"connections\":{done},\"errors\":{errors},\"secs\":{elapsed:.3},\"per_sec\":{:.1},\"p50_us\":{:.1},\"p99_us\":{:.1},\"last_error\":{}}}",
        done as f64 / elapsed,
        pct(50.0),
        pct(99.0),
        last_error.map_or("null".to_owned(), |e| format!("{e:?}")),
    );
    Ok(())
}

fn hold(to: SocketAddr, connections: usize, max: Duration) -> anyhow::Result<()> {
    raise_fd_limit();
    let started = Instant::now();
    let mut held = Vec::with_capacity(connections);
    for i in 0..connections {
        anyhow::ensure!(
            started.elapsed() < max,
            "only {i} of {connections} connections opened in time"
        );
        let mut stream = bench_connect(to)?;
        let mut back = [0u8; 1];
        round_trip(&mut stream, b"h", &mut back)?;
        held.push(stream);
    }
    println!("ready {}", held.len());
    io::stdout().flush()?;
    // Hold until the parent closes stdin, bounded by the time limit; check on request.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in io::stdin().lines() {
            let Ok(line) = line else { break };
            if line.trim() == "check" && tx.send(true).is_err() {
                return;
            }
        }
        let _ = tx.send(false);
    });
    while let Ok(true) = rx.recv_timeout(max.saturating_sub(started.elapsed())) {
        println!("{}", check_held(&mut held));
        io::stdout().flush()?;
    }
    drop(held);
    Ok(())
}

/// One round trip on each held connection: how each went, and the slowest.
fn check_held(held: &mut [TcpStream]) -> serde_json::Value {
    let (mut ok, mut reset, mut eof, mut timeout, mut slowest) = (0, 0, 0, 0, 0u128);
    for stream in held.iter_mut() {
        let started = Instant::now();
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut back = [0u8; 1];
        let outcome = stream.write_all(b"c").and_then(|()| stream.read(&mut back));
        match outcome {
            Ok(1) => ok += 1,
            Ok(_) => eof += 1,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                timeout += 1
            }
            Err(_) => reset += 1,
        }
        slowest = slowest.max(started.elapsed().as_millis());
    }
    serde_json::json!({"ok": ok, "reset": reset, "eof": eof, "timeout": timeout, "slowest_ms": slowest})
}

/// [`hold`], counting what fails: every connection must be answered once (its byte echoed)
/// and still be open, idle, once all are.
fn hold_counted(to: SocketAddr, connections: usize, max: Duration) -> anyhow::Result<()> {
    raise_fd_limit();
    let started = Instant::now();
    let mut held = Vec::with_capacity(connections);
    let (mut attempted, mut failed) = (0usize, 0usize);
    let mut first_error: Option<String> = None;
    for i in 0..connections {
        if started.elapsed() >= max {
            break;
        }
        attempted += 1;
        // A byte per connection that differs from its neighbours', so a crossed answer shows.
        let out = [b'a' + (i % 26) as u8];
        let answered = bench_connect(to).and_then(|mut stream| {
            let mut back = [0u8; 1];
            round_trip(&mut stream, &out, &mut back)?;
            if back != out {
                return Err(io::Error::other(format!(
                    "sent {:?}, answered {:?}",
                    out[0] as char, back[0] as char
                )));
            }
            Ok(stream)
        });
        match answered {
            Ok(stream) => held.push(stream),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("connection {i}: {e}"));
            }
        }
    }
    // Idle connections the mesh closed while the others opened are readable (EOF or reset).
    let mut fds: Vec<libc::pollfd> = held
        .iter()
        .map(|s| libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(s),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        })
        .collect();
    // SAFETY: poll over a valid array of pollfd structs, without waiting.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
    let closed_while_idle = fds.iter().filter(|p| p.revents != 0).count();
    println!(
        "ready {}",
        serde_json::json!({
            "requested": connections,
            "attempted": attempted,
            "answered": held.len(),
            "failed": failed,
            "first_error": first_error,
            "closed_while_idle": closed_while_idle,
            "open_secs": started.elapsed().as_secs_f64(),
        })
    );
    io::stdout().flush()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = io::stdin().read_to_end(&mut sink);
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(max.saturating_sub(started.elapsed()));
    drop(held);
    Ok(())
}

/// One idle connection being watched.
struct Watched {
    stream: TcpStream,
    opened: Instant,
}

/// How the watched connections ended.
#[derive(Default)]
struct Tally {
    connected: u64,
    reset: u64,
    eof: u64,
    data: u64,
    closed_after: Vec<u64>,
}

impl Tally {
    /// One poll over the open connections (waiting at most `wait_ms`); closed ones are
    /// counted and dropped. With `trickle`, every open one is sent a byte.
    fn watch(&mut self, open: &mut Vec<Watched>, wait_ms: i32, trickle: bool) {
        let mut fds: Vec<libc::pollfd> = open
            .iter()
            .map(|w| libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&w.stream),
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            })
            .collect();
        // SAFETY: poll over a valid array of pollfd structs.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
        let mut buf = [0u8; 4096];
        let mut index = 0;
        open.retain_mut(|w| {
            let revents = fds[index].revents;
            index += 1;
            let mut closed = None;
            if revents != 0 {
                closed = match w.stream.read(&mut buf) {
                    Ok(0) => Some(false),
                    Ok(_) => {
                        self.data += 1;
                        None
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                    Err(_) => Some(true),
                };
            }
            if closed.is_none() && trickle && w.stream.write(&[0x16]).is_err() {
                closed = Some(true);
            }
            match closed {
                Some(was_reset) => {
                    if was_reset {
                        self.reset += 1;
                    } else {
                        self.eof += 1;
                    }
                    self.closed_after
                        .push(w.opened.elapsed().as_millis() as u64);
                    false
                }
                None => true,
            }
        });
    }
}

fn idle(
    to: SocketAddr,
    connections: usize,
    payload: &[u8],
    trickle: Option<Duration>,
    watch: Duration,
    max_connect: Duration,
) -> anyhow::Result<()> {
    raise_fd_limit();
    let started = Instant::now();
    let mut open: Vec<Watched> = Vec::with_capacity(connections);
    let mut tally = Tally::default();
    let mut connect_failed = 0u64;
    let mut last_error = None;
    let mut last_trickle = Instant::now();
    for i in 0..connections {
        if started.elapsed() > max_connect {
            break;
        }
        // Notice closes while still connecting, so their times are not inflated.
        if i % 64 == 63 {
            tally.watch(&mut open, 0, false);
        }
        match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
            Ok(mut stream) => {
                if !payload.is_empty() {
                    let _ = stream.write_all(payload);
                }
                stream.set_nonblocking(true)?;
                tally.connected += 1;
                open.push(Watched {
                    stream,
                    opened: Instant::now(),
                });
            }
            // Reset before connect() returned: counted as connected and reset at once.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                tally.reset += 1;
                tally.connected += 1;
                tally.closed_after.push(0);
            }
            Err(e) => {
                connect_failed += 1;
                last_error = Some(e.to_string());
            }
        }
    }
    let attempted_secs = started.elapsed().as_secs_f64();
    let watch_until = Instant::now() + watch;
    while !open.is_empty() && Instant::now() < watch_until {
        let trickle_now = trickle.is_some_and(|every| last_trickle.elapsed() >= every);
        if trickle_now {
            last_trickle = Instant::now();
        }
        tally.watch(&mut open, 50, trickle_now);
    }
    let Tally {
        connected,
        reset,
        eof,
        data,
        mut closed_after,
    } = tally;
    closed_after.sort_unstable();
    let pct = |p: f64| {
        let rank = ((p / 100.0) * closed_after.len() as f64).ceil() as usize;
        closed_after
            .get(rank.clamp(1, closed_after.len().max(1)) - 1)
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{{\"attempted\":{connections},\"connected\":{connected},\"connect_failed\":{connect_failed},\"connect_secs\":{attempted_secs:.3},\"reset\":{reset},\"eof\":{eof},\"answered_data\":{data},\"open_at_end\":{},\"closed_ms_min\":{},\"closed_ms_p50\":{},\"closed_ms_max\":{},\"last_connect_error\":{}}}",
        open.len(),
        pct(0.0),
        pct(50.0),
        pct(100.0),
        last_error.map_or("null".to_owned(), |e| format!("{e:?}")),
    );
    Ok(())
}

fn attempt(to: SocketAddr, connections: usize, threads: usize) -> anyhow::Result<()> {
    raise_fd_limit();
    anyhow::ensure!(threads > 0, "--threads must be positive");
    let next = std::sync::Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let next = next.clone();
            std::thread::spawn(move || {
                let mut held = Vec::new();
                let mut outcomes: Vec<&'static str> = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < connections as u64 {
                    let result = TcpStream::connect_timeout(&to, Duration::from_secs(5)).and_then(
                        |mut stream| {
                            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                            stream.write_all(b"a")?;
                            let mut back = [0u8; 1];
                            match stream.read(&mut back)? {
                                0 => Err(io::ErrorKind::UnexpectedEof.into()),
                                _ => Ok(stream),
                            }
                        },
                    );
                    outcomes.push(match result {
                        Ok(stream) => {
                            held.push(stream);
                            "ok"
                        }
                        Err(e) => match e.kind() {
                            io::ErrorKind::ConnectionRefused => "refused",
                            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => "reset",
                            io::ErrorKind::UnexpectedEof => "eof",
                            _ => "timeout",
                        },
                    });
                }
                (outcomes, held)
            })
        })
        .collect();
    let mut counts = std::collections::BTreeMap::<&str, u64>::new();
    let mut held = Vec::new();
    for worker in workers {
        let (outcomes, mut streams) = worker
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
        for outcome in outcomes {
            *counts.entry(outcome).or_default() += 1;
        }
        held.append(&mut streams);
    }
    let count = |k: &str| counts.get(k).copied().unwrap_or(0);
    println!(
        "{{\"ok\":{},\"refused\":{},\"reset\":{},\"eof\":{},\"timeout\":{}}}",
        count("ok"),
        count("refused"),
        count("reset"),
        count("eof"),
        count("timeout")
    );
    drop(held);
    Ok(())
}

/// Lifts the soft open-files limit to the hard one, for servers and clients holding many
/// connections.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit with a valid out-pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
