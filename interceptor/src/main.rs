//! The `interceptor` binary: node agent and CLI.

fn main() -> std::process::ExitCode {
    interceptor::cli::main()
}
