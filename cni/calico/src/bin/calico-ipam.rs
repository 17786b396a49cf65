//! The `calico-ipam` CNI IPAM plugin.
fn main() -> std::process::ExitCode {
    calico_cni::main(calico_cni::Plugin::CalicoIpam)
}
