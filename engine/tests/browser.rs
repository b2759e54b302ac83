//! Runs the web console's end-to-end tests (tests/browser: Debian's
//! Chromium driven by playwright-core) against `wardflow demo` from this
//! build. `.ci/run` installs Chromium, the test's npm packages and builds
//! the console; screenshots go to tests/output/browser.

mod common;

use std::process::Command;

#[test]
fn console_end_to_end_in_chromium() {
    let root = common::repo_root();
    let dir = root.join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run `npm ci` in tests/browser (bash .ci/run does)"
    );
    assert!(
        std::path::Path::new("/usr/bin/chromium").is_file()
            || std::env::var_os("CHROMIUM").is_some(),
        "Chromium is not installed: apt-get install chromium (bash .ci/run does)"
    );
    assert!(
        root.join("console/dist/index.html").is_file(),
        "the console is not built: cd console && npm ci && npm run build (bash .ci/run does)"
    );
    let out = Command::new("node")
        .args(["--test", "--test-concurrency=1", "console.test.mjs"])
        .current_dir(&dir)
        .env("WARDFLOW_BIN", common::BIN)
        .output()
        .expect("node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "browser tests failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("# fail 0"), "{stdout}");
    assert!(
        stdout.contains("# skipped 0"),
        "no browser test may be skipped:\n{stdout}"
    );
    assert!(
        stdout.contains("# pass 6"),
        "every browser test ran:\n{stdout}"
    );
}
