//! Throwaway network namespaces and veth pairs.

use std::{
    fs::File,
    io::{copy, sink},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};

/// A name unique to this process and call, at most 15 bytes for a `prefix` of up to 4 bytes,
/// so it also fits an interface name (IFNAMSIZ - 1).
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    assert!(
        prefix.len() <= 4,
        "prefix `{prefix}` too long for an interface name"
    );
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{:x}x{n:x}", std::process::id())
}

/// A network namespace created with `ip netns add`, deleted on drop (which also deletes every
/// interface inside it); or one another program made, only borrowed ([`NetNs::borrow`]).
#[derive(Debug)]
pub struct NetNs {
    name: String,
    owned: bool,
}

impl NetNs {
    /// Creates a namespace with a unique name starting with `prefix`, with loopback up and IPv6
    /// duplicate address detection off (otherwise link-local addresses stay tentative for a
    /// second or two after a link comes up, and the first neighbour discovery fails).
    pub fn new(prefix: &str) -> Result<Self> {
        let name = unique_name(prefix);
        run_ok(Command::new("ip").args(["netns", "add", &name]))
            .with_context(|| format!("creating network namespace {name}"))?;
        let ns = Self { name, owned: true };
        ns.exec_ok("ip", &["link", "set", "lo", "up"])?;
        ns.exec_ok(
            "sysctl",
            &[
                "-qw",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ],
        )?;
        Ok(ns)
    }

    /// A namespace under /run/netns that someone else made and will delete (a pod's, made by
    /// containerd): used here, left alone on drop.
    pub fn borrow(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            owned: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `program args` inside the namespace and returns its output, whatever its status.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .with_context(|| format!("running `{program}` in netns {}", self.name))
    }

    /// Runs `program args` inside the namespace; fails with its stderr unless it succeeds.
    pub fn exec_ok(&self, program: &str, args: &[&str]) -> Result<String> {
        run_ok(
            Command::new("ip")
                .args(["netns", "exec", &self.name, program])
                .args(args),
        )
        .with_context(|| format!("in netns {}", self.name))
    }

    /// Runs `f` on a dedicated thread switched into this namespace (setns is per thread, so this
    /// never touches the caller's thread or a shared async worker).
    pub fn run<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            let worker = scope.spawn(move || -> Result<R> {
                let ns = File::open(&path).with_context(|| format!("opening {path}"))?;
                setns(&ns, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns {path}"))?;
                Ok(f())
            });
            match worker.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// A TCP server on `port` (all addresses) inside this namespace, listening when this
    /// returns (a socket stays in the namespace it was made in, whichever thread serves it). It
    /// accepts every connection and closes it when the client does.
    pub fn tcp_server(&self, port: u16) -> Result<TcpServer> {
        let listener = self
            .run(move || TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))?
            .with_context(|| format!("listening on TCP {port} in netns {}", self.name))?;
        TcpServer::serve(listener)
    }

    /// Whether a TCP connection from this namespace to `to:port` is established within
    /// `timeout`. A refusal (RST) returns `false` at once; only silence waits.
    pub fn tcp_connects(&self, to: IpAddr, port: u16, timeout: Duration) -> Result<bool> {
        let addr = SocketAddr::new(to, port);
        Ok(self
            .run(move || TcpStream::connect_timeout(&addr, timeout))?
            .is_ok())
    }

    /// The index of interface `name` inside this namespace.
    pub fn ifindex(&self, name: &str) -> Result<u32> {
        let name = name.to_owned();
        self.run(move || nix::net::if_::if_nametoindex(name.as_str()))?
            .with_context(|| format!("no interface in netns {}", self.name))
    }

    /// Adds `cidr` (e.g. `198.18.0.1/30`, `fd00::1/64`) to `interface` and brings it up. IPv6
    /// addresses skip duplicate address detection so they are usable at once.
    pub fn add_address(&self, interface: &str, cidr: &str) -> Result<()> {
        let mut args = vec!["addr", "add", cidr, "dev", interface];
        if cidr.contains(':') {
            args.push("nodad");
        }
        self.exec_ok("ip", &args)?;
        self.exec_ok("ip", &["link", "set", interface, "up"])?;
        Ok(())
    }

    /// ICMP echoes to `addr` every 200 ms until one is answered or two seconds pass; `true` if a
    /// reply came back. Several probes absorb the first packet lost to neighbour discovery.
    pub fn ping(&self, addr: IpAddr) -> Result<bool> {
        let target = addr.to_string();
        let output = self.exec(
            "ping",
            &["-c", "1", "-i", "0.2", "-w", "2", "-n", "-q", &target],
        )?;
        Ok(output.status.success())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if let Err(err) = run_ok(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("warning: could not delete netns {}: {err:#}", self.name);
        }
    }
}

/// A listening TCP socket served by a thread: each connection is read to its end and closed,
/// so both sides send a FIN. Dropping it stops the thread and closes the socket.
#[derive(Debug)]
pub struct TcpServer {
    listener: TcpListener,
    thread: Option<JoinHandle<()>>,
    peers: std::sync::Arc<std::sync::Mutex<Vec<SocketAddr>>>,
}

impl TcpServer {
    fn serve(listener: TcpListener) -> Result<Self> {
        let accepting = listener.try_clone()?;
        let peers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = peers.clone();
        let thread = std::thread::spawn(move || {
            // Ends when drop shuts the socket down (accept then fails).
            while let Ok((mut stream, peer)) = accepting.accept() {
                seen.lock().unwrap_or_else(|e| e.into_inner()).push(peer);
                std::thread::spawn(move || {
                    let _ = copy(&mut stream, &mut sink());
                });
            }
        });
        Ok(Self {
            listener,
            thread: Some(thread),
            peers,
        })
    }

    /// The source address of every connection accepted so far, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        // shutdown(2) on a listening socket wakes a blocked accept on Linux.
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A veth pair with one end in each of two namespaces. Dropping it deletes the pair (also gone
/// when either namespace is deleted).
#[derive(Debug)]
pub struct Veth {
    /// Namespace of the first end, by name, so the pair does not borrow the namespace.
    a_ns: String,
    /// Interface name of the end in the first namespace.
    pub a_name: String,
    /// Interface name of the end in the second namespace.
    pub b_name: String,
}

impl Veth {
    /// Creates a pair with unique names directly inside `a` and `b` (never in the caller's
    /// namespace, so nothing is left behind there if the test dies).
    pub fn between(a: &NetNs, b: &NetNs) -> Result<Self> {
        let a_name = unique_name("va");
        let b_name = unique_name("vb");
        run_ok(Command::new("ip").args([
            "link",
            "add",
            &a_name,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            &b_name,
            "netns",
            b.name(),
        ]))
        .with_context(|| format!("creating veth {a_name} <-> {b_name}"))?;
        Ok(Self {
            a_ns: a.name().to_owned(),
            a_name,
            b_name,
        })
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        // Already gone if the namespace went first; nothing to report then.
        let _ = Command::new("ip")
            .args(["-n", &self.a_ns, "link", "del", &self.a_name])
            .output();
    }
}

/// Runs `cmd`; returns its stdout, or an error carrying the command line and its stderr.
pub(crate) fn run_ok(cmd: &mut Command) -> Result<String> {
    let line = format!("{cmd:?}");
    let output = cmd.output().with_context(|| format!("spawning {line}"))?;
    if !output.status.success() {
        bail!(
            "{line} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
