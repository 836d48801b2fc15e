//! fdtrace's demo target: a tiny HTTP server with a descriptor leak.
//!
//! After every request the server reloads its "template" through `load_template`, which opens
//! a file and never closes it. With RLIMIT_NOFILE lowered to 128 the table fills after about
//! 120 requests, and then accept4() fails with EMFILE: the next connection waits in the listen
//! backlog, exactly the state a proxy in front of such a server reports as 502/504.
//!
//! Prints `listening on 127.0.0.1:PORT` first; `cargo xtask demo` drives it.

use std::{
    fs::File,
    io::{ErrorKind, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    thread,
    time::Duration,
};

const LIMIT: u64 = 128;

fn main() -> std::io::Result<()> {
    lower_limit(LIMIT);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("listening on {}", listener.local_addr()?);
    let mut template = load_template("/etc/hostname").unwrap_or_default();
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                handle(stream, &template);
                // Picks up edits to the template: the reload is where the leak is.
                match load_template("/etc/hostname") {
                    Ok(text) => template = text,
                    Err(e) => eprintln!("demo-server: reloading the template: {e}"),
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
                eprintln!("demo-server: accept: {e}; retrying");
                thread::sleep(Duration::from_millis(500));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn handle(mut stream: TcpStream, body: &str) {
    let mut request = [0u8; 1024];
    let _ = stream.read(&mut request);
    let _ = write!(
        stream,
        "HTTP/1.0 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
}

/// The bug: the file is read but its descriptor is leaked on purpose.
#[inline(never)]
fn load_template(path: &str) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    std::mem::forget(file);
    Ok(text)
}

/// `ulimit -n` for ourselves, so the demo reaches the limit in a minute.
fn lower_limit(soft: u64) {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut rl) == 0 {
            rl.rlim_cur = soft.min(rl.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const rl);
        }
    }
}
