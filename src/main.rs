use std::process::ExitCode;

fn main() -> ExitCode {
    cowimg::cli::main()
}
