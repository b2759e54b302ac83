fn main() -> std::process::ExitCode {
    match wardflow_engine::cli::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wardflow: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
