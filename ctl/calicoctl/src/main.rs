//! calicoctl: the command line for projectcalico.org/v3 resources, reading and writing the same
//! etcd keys the agent watches.

mod config;
mod dryrun;
mod input;
mod ipam;
mod node;
mod output;
mod resources;
mod trace;

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory, Parser, Subcommand};

use crate::output::Format;

const EXAMPLES: &str = "\
Examples:
  calicoctl apply -f policy.yaml
  calicoctl get ippools -o wide
  calicoctl get networkpolicy -A -o yaml
  calicoctl delete globalnetworkpolicy deny-all
  calicoctl label nodes node1 rack=r1
  calicoctl ipam show --show-blocks

Datastore: --config FILE (kind CalicoAPIConfig), else /etc/calico/calicoctl.cfg if it exists,
else the environment (DATASTORE_TYPE=etcdv3, ETCD_ENDPOINTS, ETCD_CA_CERT_FILE, ETCD_CERT_FILE,
ETCD_KEY_FILE, ETCD_USERNAME, ETCD_PASSWORD).";

#[derive(Parser)]
#[command(name = "calicoctl", version, about = "Manage Calico resources in the etcd datastore", after_help = EXAMPLES)]
struct Cli {
    /// Path to a CalicoAPIConfig file.
    #[arg(short = 'c', long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create resources from a file, a directory or stdin; fails on names that exist.
    #[command(
        after_help = "Examples:\n  calicoctl create -f pool.yaml\n  cat policy.yaml | calicoctl create -f -\n  calicoctl create -f ./policies/ --skip-exists"
    )]
    Create {
        #[command(flatten)]
        files: FileArgs,
        /// Treat resources that already exist as created.
        #[arg(long)]
        skip_exists: bool,
    },
    /// Create or replace resources (idempotent).
    #[command(
        after_help = "Examples:\n  calicoctl apply -f policy.yaml\n  calicoctl apply -f ./manifests/ -n staging"
    )]
    Apply {
        #[command(flatten)]
        files: FileArgs,
    },
    /// Replace existing resources; a stale metadata.resourceVersion is refused.
    #[command(
        after_help = "Examples:\n  calicoctl get ippool pool1 -o yaml > pool.yaml\n  (edit pool.yaml)\n  calicoctl replace -f pool.yaml"
    )]
    Replace {
        #[command(flatten)]
        files: FileArgs,
    },
    /// Delete resources named in a file, or KIND NAME...
    #[command(
        after_help = "Examples:\n  calicoctl delete -f policy.yaml\n  calicoctl delete ippool pool1\n  calicoctl delete networkpolicy allow-web -n prod"
    )]
    Delete {
        /// Resource kind (name, plural or short name) when deleting by name.
        kind: Option<String>,
        /// Names to delete.
        names: Vec<String>,
        /// File, directory or - for stdin.
        #[arg(short = 'f', long = "filename")]
        filename: Option<String>,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Treat resources that do not exist as deleted.
        #[arg(long)]
        skip_not_exists: bool,
        /// Show what would be deleted, deleting nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show resources.
    #[command(
        after_help = "Examples:\n  calicoctl get ippools\n  calicoctl get ippool pool1 -o yaml\n  calicoctl get netpol -A -o wide\n  calicoctl get ippools -o custom-columns=NAME,CIDR"
    )]
    Get {
        /// Resource kind: name, plural or short name (ippool, gnp, netpol, hep, wep, ...).
        kind: String,
        /// Names to show (all when none).
        names: Vec<String>,
        /// ps (default), wide, yaml, json or custom-columns=COL,...
        #[arg(short = 'o', long, default_value = "ps")]
        output: Format,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// All namespaces.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Apply a JSON merge patch to a resource.
    #[command(
        after_help = "Examples:\n  calicoctl patch ippool pool1 -p '{\"spec\":{\"disabled\":true}}'\n  calicoctl patch netpol allow-web -n prod -p '{\"spec\":{\"order\":50}}'"
    )]
    Patch {
        kind: String,
        name: String,
        /// The patch, as JSON (RFC 7386 merge patch).
        #[arg(short = 'p', long)]
        patch: String,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// Set or remove a label on a resource.
    #[command(
        after_help = "Examples:\n  calicoctl label nodes node1 rack=r1\n  calicoctl label nodes node1 rack=r2 --overwrite\n  calicoctl label nodes node1 rack-\n  calicoctl label nodes node1 rack --remove"
    )]
    Label {
        kind: String,
        name: String,
        /// key=value to set, key- (or key with --remove) to remove.
        label: String,
        /// Replace an existing value.
        #[arg(long)]
        overwrite: bool,
        /// Remove the label.
        #[arg(long)]
        remove: bool,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// IP address management.
    #[command(
        subcommand,
        after_help = "Examples:\n  calicoctl ipam show --show-blocks\n  calicoctl ipam check\n  calicoctl ipam release --ip=10.244.0.5"
    )]
    Ipam(ipam::IpamCommand),
    /// Policy tools: trace one packet through an endpoint's policy.
    #[command(
        subcommand,
        after_help = "Examples:\n  calicoctl policy trace shop/db-1 10.0.0.11 tcp/5432"
    )]
    Policy(trace::PolicyCommand),
    /// Node status and system checks.
    #[command(
        subcommand,
        after_help = "Examples:\n  calicoctl node status\n  calicoctl node checksystem"
    )]
    Node(node::NodeCommand),
    /// Convert Kubernetes NetworkPolicy (networking.k8s.io/v1) to Calico NetworkPolicy.
    #[command(
        after_help = "Examples:\n  calicoctl convert -f k8s-policy.yaml\n  calicoctl convert -f k8s-policy.yaml -o json"
    )]
    Convert {
        #[arg(short = 'f', long = "filename")]
        filename: String,
        /// yaml (default) or json.
        #[arg(short = 'o', long, default_value = "yaml")]
        output: Format,
    },
    /// Client and cluster version.
    #[command(after_help = "Examples:\n  calicoctl version")]
    Version,
    /// Shell completion script.
    #[command(
        after_help = "Examples:\n  calicoctl completion bash > /etc/bash_completion.d/calicoctl"
    )]
    Completion { shell: clap_complete::Shell },
}

#[derive(clap::Args)]
struct FileArgs {
    /// File, directory of .yaml/.yml/.json files, or - for stdin.
    #[arg(short = 'f', long = "filename", required = true)]
    filename: String,
    /// Namespace for namespaced resources that name none (default `default`).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Validate and show what would change (create, update, delete), writing nothing.
    #[arg(long)]
    dry_run: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    use resources::Action;
    let config = cli.config.as_deref();
    match cli.command {
        Command::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "calicoctl",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Convert { filename, output } => resources::convert(&filename, &output),
        Command::Version => resources::version(config).await,
        Command::Create { files, skip_exists } => {
            resources::write(
                config,
                Action::Create,
                &files.filename,
                files.namespace.as_deref(),
                skip_exists,
                files.dry_run,
            )
            .await
        }
        Command::Apply { files } => {
            resources::write(
                config,
                Action::Apply,
                &files.filename,
                files.namespace.as_deref(),
                false,
                files.dry_run,
            )
            .await
        }
        Command::Replace { files } => {
            resources::write(
                config,
                Action::Replace,
                &files.filename,
                files.namespace.as_deref(),
                false,
                files.dry_run,
            )
            .await
        }
        Command::Delete {
            kind,
            names,
            filename,
            namespace,
            skip_not_exists,
            dry_run,
        } => match (filename, kind) {
            (Some(f), None) => {
                resources::write(
                    config,
                    Action::Delete,
                    &f,
                    namespace.as_deref(),
                    skip_not_exists,
                    dry_run,
                )
                .await
            }
            (None, Some(kind)) if !names.is_empty() => {
                resources::delete_named(
                    config,
                    &kind,
                    &names,
                    namespace.as_deref(),
                    skip_not_exists,
                    dry_run,
                )
                .await
            }
            _ => anyhow::bail!(
                "delete needs either -f FILE or KIND NAME... (see calicoctl delete --help)"
            ),
        },
        Command::Get {
            kind,
            names,
            output,
            namespace,
            all_namespaces,
        } => {
            resources::get(
                config,
                &kind,
                &names,
                &output,
                namespace.as_deref(),
                all_namespaces,
            )
            .await
        }
        Command::Patch {
            kind,
            name,
            patch,
            namespace,
        } => resources::patch(config, &kind, &name, &patch, namespace.as_deref()).await,
        Command::Label {
            kind,
            name,
            label,
            overwrite,
            remove,
            namespace,
        } => {
            resources::label(
                config,
                &kind,
                &name,
                &label,
                overwrite,
                remove,
                namespace.as_deref(),
            )
            .await
        }
        Command::Ipam(cmd) => ipam::run(config, cmd).await,
        Command::Node(cmd) => node::run(config, cmd).await,
        Command::Policy(cmd) => trace::run(config, cmd).await,
    }
}
