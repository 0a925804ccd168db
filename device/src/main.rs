//! `ipoib-vfio`: the device-model daemon, one per HCA.

fn main() -> std::process::ExitCode {
    ipoib_device::cli::main()
}
