//! A real etcd server (Debian `etcd-server`) on free loopback ports with a temporary data dir.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

const START_TIMEOUT: Duration = Duration::from_secs(30);
const START_ATTEMPTS: usize = 3;

/// A running etcd, killed and its data removed on drop.
#[derive(Debug)]
pub struct Etcd {
    child: Child,
    client_port: u16,
    peer_port: u16,
    tls: Option<TlsFiles>,
    dir: TempDir,
}

/// PEM files of a TLS etcd: the CA that signed the server, and a client certificate and key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub(crate) server_cert: PathBuf,
    pub(crate) server_key: PathBuf,
}

impl Etcd {
    /// Starts etcd on free loopback ports and waits until it reports healthy.
    pub fn start() -> Result<Self> {
        Self::start_with(false)
    }

    /// Starts etcd serving clients over TLS only, requiring client certificates signed by a
    /// CA made for it (see [`Etcd::tls_files`]).
    pub fn start_tls() -> Result<Self> {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Result<Self> {
        let mut last_err = None;
        // A port picked as free can be taken by a parallel test before etcd binds it: retry.
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(tls) {
                Ok(etcd) => return Ok(etcd),
                Err(err) => last_err = Some(err),
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    fn try_start(tls: bool) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("calico-etcd-")
            .tempdir()
            .context("creating etcd data dir")?;
        let tls = if tls {
            Some(make_certificates(&dir.path().join("tls"))?)
        } else {
            None
        };
        let (client_port, peer_port) = free_port_pair()?;
        let child = spawn(dir.path(), client_port, peer_port, tls.as_ref())?;
        let mut etcd = Self {
            child,
            client_port,
            peer_port,
            tls,
            dir,
        };
        etcd.wait_healthy()?;
        Ok(etcd)
    }

    /// The TLS files, for an etcd started with [`Etcd::start_tls`].
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// Kills etcd (SIGKILL, like a crash) and leaves it down until [`Etcd::resume`].
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill().context("killing etcd")?;
        self.child.wait().context("reaping etcd")?;
        Ok(())
    }

    /// Freezes etcd (SIGSTOP): its connections stay open but nothing answers, as with a hung
    /// server or a black-holed path. [`Etcd::thaw`] resumes it.
    pub fn freeze(&self) -> Result<()> {
        self.signal(nix::sys::signal::Signal::SIGSTOP)
    }

    pub fn thaw(&self) -> Result<()> {
        self.signal(nix::sys::signal::Signal::SIGCONT)
    }

    fn signal(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).with_context(|| format!("sending etcd {signal}"))
    }

    /// etcd's own Prometheus counters (`/metrics` on the client port, plain HTTP only).
    pub fn metrics(&self) -> Result<String> {
        let (status, body) = crate::http::get(
            SocketAddr::from((Ipv4Addr::LOCALHOST, self.client_port)),
            "/metrics",
        )?;
        anyhow::ensure!(status == 200, "etcd /metrics answered {status}");
        Ok(body)
    }

    /// Starts etcd again on the same ports and data (after [`Etcd::kill`]).
    pub fn resume(&mut self) -> Result<()> {
        self.child = spawn(
            self.dir.path(),
            self.client_port,
            self.peer_port,
            self.tls.as_ref(),
        )?;
        self.wait_healthy()
    }

    /// The client URL, e.g. `http://127.0.0.1:41234` (`https://` for a TLS etcd).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The client port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.client_port
    }

    /// Where etcd writes its log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn wait_healthy(&mut self) -> Result<()> {
        let log_path = self.log_path();
        let log_path = log_path.as_path();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "etcd exited during start-up ({status}); log tail:\n{}",
                    log_tail(log_path)
                );
            }
            if self.is_healthy() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd not healthy after {START_TIMEOUT:?}; log tail:\n{}",
                    log_tail(log_path)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Asks etcd whether it is healthy: `/health` over plain HTTP, or `etcdctl endpoint
    /// health` with the client certificate for a TLS etcd.
    pub fn is_healthy(&self) -> bool {
        if let Some(tls) = &self.tls {
            return Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={}", self.endpoint()))
                .arg(format!("--cacert={}", tls.ca.display()))
                .arg(format!("--cert={}", tls.client_cert.display()))
                .arg(format!("--key={}", tls.client_key.display()))
                .args(["endpoint", "health"])
                .output()
                .is_ok_and(|o| o.status.success());
        }
        crate::http::get(
            SocketAddr::from((Ipv4Addr::LOCALHOST, self.client_port)),
            "/health",
        )
        .is_ok_and(|(status, body)| status == 200 && body.contains(r#""health":"true""#))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns etcd with its data under `dir`, appending to `dir/etcd.log`.
fn spawn(
    dir: &std::path::Path,
    client_port: u16,
    peer_port: u16,
    tls: Option<&TlsFiles>,
) -> Result<Child> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let client = format!("{scheme}://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("etcd.log"))
        .context("opening etcd log")?;
    let mut command = Command::new("etcd");
    if let Some(tls) = tls {
        command
            .arg(format!("--cert-file={}", tls.server_cert.display()))
            .arg(format!("--key-file={}", tls.server_key.display()))
            .arg(format!("--trusted-ca-file={}", tls.ca.display()))
            .arg("--client-cert-auth");
    }
    command
        .arg("--name=harness")
        .arg(format!("--data-dir={}", dir.join("data").display()))
        .arg(format!("--listen-client-urls={client}"))
        .arg(format!("--advertise-client-urls={client}"))
        .arg(format!("--listen-peer-urls={peer}"))
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .arg(format!("--initial-cluster=harness={peer}"))
        .arg("--logger=zap")
        .arg("--log-outputs=stderr")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("spawning etcd (is Debian's etcd-server installed?)")
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl.
pub(crate) fn make_certificates(dir: &std::path::Path) -> Result<TlsFiles> {
    fs::create_dir_all(dir)?;
    let path = |name: &str| dir.join(name);
    let openssl = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("running openssl (Debian package openssl)")?;
        if !out.status.success() {
            bail!(
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=harness-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ])?;
    fs::write(
        path("server.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )?;
    fs::write(path("client.ext"), "extendedKeyUsage=clientAuth\n")?;
    for (who, ext) in [("server", "server.ext"), ("client", "client.ext")] {
        let (key, csr, pem) = (
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.pem"),
        );
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={who}"),
            "-keyout",
            &key,
            "-out",
            &csr,
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext,
            "-out",
            &pem,
        ])?;
    }
    Ok(TlsFiles {
        ca: path("ca.pem"),
        client_cert: path("client.pem"),
        client_key: path("client.key"),
        server_cert: path("server.pem"),
        server_key: path("server.key"),
    })
}

/// Two distinct free loopback ports (both held while the second is chosen).
pub(crate) fn free_port_pair() -> Result<(u16, u16)> {
    let a = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    let b = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

pub(crate) fn log_tail(path: &std::path::Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
