//! A loopback port forward into a network namespace: a listener on 127.0.0.1:<port> inside the
//! namespace whose connections are relayed to 127.0.0.1:<port> in the caller's namespace. This
//! is how an agent running in a test "host" namespace reaches the test's etcd, without an
//! interface in the caller's namespace.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::AsFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use anyhow::{Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::NetNs;

/// Relays until dropped.
pub struct Forward {
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Forward {
    /// Listens on 127.0.0.1:`port` inside `ns`, relaying to 127.0.0.1:`port` here.
    pub fn loopback(ns: &NetNs, port: u16) -> Result<Self> {
        // The socket belongs to the namespace it was created in, whichever thread uses it.
        let listener = ns
            .run(|| TcpListener::bind(("127.0.0.1", port)))?
            .with_context(|| format!("listening on 127.0.0.1:{port} in netns {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let acceptor = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                // Woken by a connection at once; every 100 ms to look at the stop flag. (A
                // sleep between tries would hold each new connection up to its length, which
                // a plugin's connect to etcd would then measure.)
                let mut ready = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                if !matches!(poll(&mut ready, PollTimeout::from(100u16)), Ok(n) if n > 0) {
                    continue;
                }
                // An error: the connection went before it was taken; wait for the next.
                if let Ok((inside, _)) = listener.accept() {
                    let _ = inside.set_nonblocking(false);
                    if let Ok(outside) = TcpStream::connect(("127.0.0.1", port)) {
                        // gRPC sends small frames: Nagle plus delayed ACKs on a relay would
                        // add tens of milliseconds to every watch event.
                        let _ = inside.set_nodelay(true);
                        let _ = outside.set_nodelay(true);
                        relay(inside, outside);
                    }
                }
            }
        });
        Ok(Self {
            stop,
            acceptor: Some(acceptor),
        })
    }
}

fn relay(a: TcpStream, b: TcpStream) {
    let pipe = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let mut buf = [0u8; 16384];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Write);
            let _ = from.shutdown(Shutdown::Read);
        });
    };
    if let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) {
        pipe(a, b2);
        pipe(b, a2);
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}
