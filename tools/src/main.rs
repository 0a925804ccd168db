//! `ipoib-tool`: administration of ipoib-vfio.

fn main() -> std::process::ExitCode {
    ipoib_tool::main()
}
