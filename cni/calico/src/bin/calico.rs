//! The `calico` CNI plugin, and the `calico-ipam` IPAM plugin when run under that name.
fn main() -> std::process::ExitCode {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    calico_cni::main(calico_cni::Plugin::from_program_name(&argv0))
}
