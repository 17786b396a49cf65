//! The `calico` CNI plugin.
fn main() -> std::process::ExitCode {
    calico_cni::main(calico_cni::Plugin::Calico)
}
