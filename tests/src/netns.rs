//! Throwaway network namespaces and veth pairs.

use std::{
    fs::File,
    net::IpAddr,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
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
/// interface inside it).
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates a namespace with a unique name starting with `prefix`, with loopback up and IPv6
    /// duplicate address detection off (otherwise link-local addresses stay tentative for a
    /// second or two after a link comes up, and the first neighbour discovery fails).
    pub fn new(prefix: &str) -> Result<Self> {
        let name = unique_name(prefix);
        run_ok(Command::new("ip").args(["netns", "add", &name]))
            .with_context(|| format!("creating network namespace {name}"))?;
        let ns = Self { name };
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
        if let Err(err) = run_ok(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("warning: could not delete netns {}: {err:#}", self.name);
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
