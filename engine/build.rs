//! Builds the web console (`console/`, React with Vite) into
//! `console/dist` when its build is missing or older than its sources and
//! npm is on the path, so `cargo run -- demo` serves a working console.
//! Without npm, or when the build fails, it warns and the engine serves a
//! page that says how to build it. WARDFLOW_SKIP_CONSOLE_BUILD=1 skips it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

const SOURCES: [&str; 7] = [
    "src",
    "index.html",
    "package.json",
    "package-lock.json",
    "vite.config.ts",
    "tsconfig.json",
    "public",
];

fn newest(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_dir() {
        std::fs::read_dir(path)
            .ok()?
            .filter_map(|e| e.ok())
            .filter_map(|e| newest(&e.path()))
            .max()
    } else {
        meta.modified().ok()
    }
}

fn run(console: &Path, args: &[&str]) -> Result<(), String> {
    let status = Command::new("npm")
        .args(args)
        .current_dir(console)
        .status()
        .map_err(|e| format!("npm {}: {e}", args.join(" ")))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("npm {} failed ({status})", args.join(" ")))
    }
}

fn main() {
    let console = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../console");
    println!("cargo:rerun-if-env-changed=WARDFLOW_SKIP_CONSOLE_BUILD");
    for s in SOURCES {
        println!("cargo:rerun-if-changed=../console/{s}");
    }
    if std::env::var_os("WARDFLOW_SKIP_CONSOLE_BUILD").is_some_and(|v| v != "0") {
        return;
    }
    if !console.join("package.json").is_file() {
        return;
    }
    let sources = SOURCES
        .iter()
        .filter_map(|s| newest(&console.join(s)))
        .max();
    let built = newest(&console.join("dist/index.html"));
    if built.is_some() && built >= sources {
        return;
    }
    let lock = newest(&console.join("package-lock.json"));
    let installed = newest(&console.join("node_modules/.package-lock.json"));
    let result = (|| {
        if installed.is_none() || installed < lock {
            run(&console, &["ci", "--no-audit", "--no-fund"])?;
        }
        run(&console, &["run", "build"])
    })();
    if let Err(e) = result {
        println!(
            "cargo:warning=the web console was not built ({e}); the engine will serve a page that says how: cd console && npm ci && npm run build"
        );
    }
}
