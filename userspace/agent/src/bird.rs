//! BIRD beside the agent, as calico/node runs it: the configuration is rendered from the
//! datastore (calico-bgp), checked with `bird -p`, written atomically and loaded with
//! `birdc configure` only when its content changed; BIRD is started, and restarted if it
//! dies. A configuration BIRD refuses is logged, counted, and written next to the control
//! socket as `bird.error` (which `calicoctl node status` shows); the running BIRD keeps the
//! last good one.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
};

use calico_bgp::{render, BgpInputs};
use calico_model::{Kind, Resource};
use ipnet::IpNet;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::metrics::Metrics;

pub struct Bird {
    dir: PathBuf,
    node: String,
    metrics: Arc<Metrics>,
    resources: BTreeMap<(Kind, String), Resource>,
    blocks: Vec<IpNet>,
    child: Option<Child>,
    /// The configuration BIRD runs.
    installed: Option<String>,
    /// The last rendering that was refused, so it is reported once.
    refused: Option<String>,
}

/// Whether `kind` feeds the BGP configuration.
pub fn is_bgp_kind(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Node | Kind::BGPConfiguration | Kind::BGPPeer | Kind::IPPool
    )
}

impl Bird {
    pub fn new(dir: PathBuf, node: String, metrics: Arc<Metrics>) -> Self {
        Self {
            dir,
            node,
            metrics,
            resources: BTreeMap::new(),
            blocks: Vec::new(),
            child: None,
            installed: None,
            refused: None,
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("bird.ctl")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("bird.cfg")
    }

    fn error_path(&self) -> PathBuf {
        self.dir.join("bird.error")
    }

    pub fn clear(&mut self) {
        self.resources.clear();
    }

    pub fn put(&mut self, r: &Resource) {
        if is_bgp_kind(r.kind()) {
            self.resources
                .insert((r.kind(), r.metadata().name.clone()), r.clone());
        }
    }

    pub fn delete(&mut self, kind: Kind, name: &str) {
        self.resources.remove(&(kind, name.to_owned()));
    }

    pub fn set_blocks(&mut self, blocks: Vec<IpNet>) {
        self.blocks = blocks;
    }

    fn refuse(&mut self, reason: String) {
        if self.refused.as_ref() != Some(&reason) {
            tracing::error!(error = %reason, "BIRD configuration refused; BIRD keeps its last good one");
            self.metrics.bird_config_errors.inc();
            let _ = std::fs::write(self.error_path(), format!("{reason}\n"));
        }
        self.refused = Some(reason);
    }

    /// Renders; when the result differs from what BIRD runs, checks, installs and loads it.
    pub async fn sync(&mut self) {
        let resources: Vec<Resource> = self.resources.values().cloned().collect();
        let mut inputs = match BgpInputs::from_resources(&resources, self.blocks.clone()) {
            Ok(i) => i,
            Err(e) => return self.refuse(e.to_string()),
        };
        let me = inputs.nodes.iter().find(|n| n.name == self.node);
        if me.is_none_or(|n| n.ipv4.is_none()) {
            // No BGP address for this node (no --ip): nothing to peer with.
            return;
        }
        for (_, p) in &inputs.peers {
            if let Some(f) = p.password.as_ref().and_then(|pw| pw.file.clone()) {
                match std::fs::read_to_string(&f) {
                    Ok(text) => {
                        inputs.passwords.insert(f, text);
                    }
                    Err(e) => tracing::warn!(file = %f, error = %e, "BGP password file unreadable"),
                }
            }
        }
        let config = match render(&inputs, &self.node) {
            Ok(c) => c,
            Err(e) => return self.refuse(e.to_string()),
        };
        if self.installed.as_ref() == Some(&config) && self.child.is_some() {
            // Back to what BIRD runs: whatever was refused in between no longer matters.
            if self.refused.take().is_some() {
                let _ = std::fs::remove_file(self.error_path());
                tracing::info!("BIRD configuration acceptable again");
            }
            return;
        }
        if let Err(e) = std::fs::create_dir_all(&self.dir) {
            return self.refuse(format!("creating {}: {e}", self.dir.display()));
        }
        // Check with BIRD's own parser before anything is replaced.
        let candidate = self.dir.join("bird.cfg.new");
        if let Err(e) = std::fs::write(&candidate, &config) {
            return self.refuse(format!("writing {}: {e}", candidate.display()));
        }
        match Command::new("bird")
            .arg("-p")
            .arg("-c")
            .arg(&candidate)
            .output()
            .await
        {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                let reason = format!("bird -p: {}", String::from_utf8_lossy(&o.stderr).trim());
                return self.refuse(reason);
            }
            Err(e) => return self.refuse(format!("running bird (Debian package bird2): {e}")),
        }
        if let Err(e) = std::fs::rename(&candidate, self.config_path()) {
            return self.refuse(format!("installing {}: {e}", self.config_path().display()));
        }
        let _ = std::fs::remove_file(self.error_path());
        self.refused = None;
        if self.child.is_some() || self.answering().await {
            match birdc(&self.socket(), &["configure"]).await {
                Ok(out)
                    if out.contains("Reconfigured")
                        || out.contains("Reconfiguration in progress") =>
                {
                    tracing::info!("BIRD reconfigured");
                }
                Ok(out) => self.refuse(format!("birdc configure: {}", out.trim())),
                Err(e) => self.refuse(format!("birdc configure: {e}")),
            }
        } else {
            self.start();
        }
        self.installed = Some(config);
    }

    async fn answering(&self) -> bool {
        birdc(&self.socket(), &["show", "status"]).await.is_ok()
    }

    fn start(&mut self) {
        let mut cmd = Command::new("bird");
        cmd.arg("-f")
            .arg("-c")
            .arg(self.config_path())
            .arg("-s")
            .arg(self.socket())
            .arg("-P")
            .arg(self.dir.join("bird.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        match cmd.spawn() {
            Ok(mut child) => {
                if let Some(stderr) = child.stderr.take() {
                    tokio::spawn(async move {
                        let mut lines = BufReader::new(stderr).lines();
                        while let Ok(Some(line)) = lines.next_line().await {
                            tracing::info!(target: "bird", "{line}");
                        }
                    });
                }
                tracing::info!(pid = child.id(), socket = %self.socket().display(), "BIRD started");
                self.child = Some(child);
            }
            Err(e) => self.refuse(format!("starting bird: {e}")),
        }
    }

    /// Restarts BIRD if it died.
    pub fn supervise(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        if let Ok(Some(status)) = child.try_wait() {
            tracing::error!(%status, "BIRD exited; restarting it");
            self.metrics.bird_restarts.inc();
            self.child = None;
            if self.installed.is_some() {
                self.start();
            }
        }
    }
}

async fn birdc(socket: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("birdc")
        .arg("-s")
        .arg(socket)
        .args(args)
        .output()
        .await
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || text.contains("Unable to connect") {
        return Err(format!(
            "{}{}",
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(text)
}
