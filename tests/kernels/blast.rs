//! The guests' workload (tests/kernels/init), built static by `cargo xtask
//! kernels` with plain rustc: busybox has no sender that moves a known
//! number of bytes (its nc stops after 1 KiB).
//!
//!   blast recv PORT      accept one connection, read to EOF, print the bytes
//!   blast send PORT N    connect to 127.0.0.1:PORT, write N bytes, close
//!   blast hold PORT N    the same, then keep the connection open until killed
//!   blast pingpong N     N round trips between two threads over pipes
//!                        (at least 2N context switches and 2N wake-ups)
//!   blast paced PORT N   like send, in 1 000-byte writes with TCP_NODELAY
//!                        and a pause after each, so each is one segment
//!                        (loopback's 64 KiB MSS would otherwise make a
//!                        few large ones): for the loss rule's retransmits
//!   blast udp PORT N     N datagrams to 127.0.0.1:PORT, paced (a closed
//!                        port: each one is a drop, in Udp NoPorts)
use std::io::{Read, Write};

/// Connects to 127.0.0.1:`port`, writes `n` bytes in 1 000-byte writes
/// (`paced`: TCP_NODELAY and a pause after each), closes its side and waits
/// for the peer's close.
fn send(port: u16, n: u64, paced: bool) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    if paced {
        s.set_nodelay(true).expect("TCP_NODELAY");
    }
    let chunk = vec![7u8; 1000];
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..k]).expect("write");
        left -= k as u64;
        if paced {
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
    }
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let _ = s.read(&mut [0u8; 1]);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize| -> u64 { args[i].parse().expect("a number") };
    match args.get(1).map(String::as_str) {
        Some("recv") => {
            let l = std::net::TcpListener::bind(("127.0.0.1", num(2) as u16)).expect("bind");
            println!("listening");
            let (mut s, _) = l.accept().expect("accept");
            let mut buf = vec![0u8; 1 << 16];
            let mut n = 0u64;
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => n += k as u64,
                    Err(e) => panic!("read: {e}"),
                }
            }
            println!("{n}");
        }
        Some("send") => send(num(2) as u16, num(3), false),
        Some("paced") => send(num(2) as u16, num(3), true),
        Some("hold") => {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", num(2) as u16)).expect("connect");
            s.write_all(&vec![7u8; num(3) as usize]).expect("write");
            println!("sent");
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
        Some("pingpong") => {
            let n = num(2);
            let (mut a_rx, mut b_tx) = std::io::pipe().expect("pipe");
            let (mut b_rx, mut a_tx) = std::io::pipe().expect("pipe");
            let t = std::thread::spawn(move || {
                let mut b = [0u8; 1];
                for _ in 0..n {
                    a_rx.read_exact(&mut b).expect("read");
                    a_tx.write_all(&b).expect("write");
                }
            });
            let mut b = [0u8; 1];
            for _ in 0..n {
                b_tx.write_all(&b).expect("write");
                b_rx.read_exact(&mut b).expect("read");
            }
            t.join().expect("join");
        }
        Some("udp") => {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            for _ in 0..num(3) {
                s.send_to(&[1u8; 64], ("127.0.0.1", num(2) as u16)).expect("send_to");
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
        _ => {
            eprintln!("usage: blast recv PORT | send PORT N | hold PORT N | paced PORT N | pingpong N | udp PORT N");
            std::process::exit(2);
        }
    }
}
