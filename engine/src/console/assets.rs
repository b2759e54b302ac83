//! The console's built files (`console/dist`), or a page that says how to
//! build them.

use std::path::{Component, Path, PathBuf};

use ntex::web::{self, HttpRequest, HttpResponse};

use super::State;

/// What every page of the console is sent with: only its own scripts,
/// never framed, no referrer leaves it.
fn secured(mut r: web::HttpResponseBuilder) -> web::HttpResponseBuilder {
    r.header(
        "content-security-policy",
        "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    )
    .header("x-content-type-options", "nosniff")
    .header("referrer-policy", "no-referrer")
    .header("x-frame-options", "DENY");
    r
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "wasm" => "application/wasm",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// The page served when the console is not built.
fn not_built(dir: &Path) -> HttpResponse {
    let dir = dir.display().to_string();
    let escape = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let body = format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Wardflow console: not built</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:44rem;margin:3rem auto;padding:0 1rem;background:#111;color:#eee}}code,pre{{background:#222;padding:.2rem .4rem;border-radius:4px}}pre{{padding:1rem}}</style></head>
<body><main><h1>The Wardflow console is not built</h1>
<p>The engine is running; the web console's files are missing from <code>{}</code>.</p>
<p>Build them from the source tree (Node.js 20 or newer and npm):</p>
<pre>cd console
npm ci
npm run build</pre>
<p>then reload this page. <code>cargo build</code> does the same when npm is on the path.
To serve a console built elsewhere, start the engine with <code>--console-dir DIR</code> or set <code>WARDFLOW_CONSOLE_DIR</code>.</p>
<p>The alert API (<code>/v1/alerts</code>), <code>/healthz</code> and <code>/metrics</code> work without it.</p>
</main></body></html>"#,
        escape(&dir)
    );
    secured(HttpResponse::ServiceUnavailable())
        .content_type("text/html; charset=utf-8")
        .header("cache-control", "no-store")
        .body(body)
}

async fn send(root: &Path, rel: &Path) -> HttpResponse {
    let path = root.join(rel);
    let immutable = rel.starts_with("assets");
    match ntex::rt::spawn_blocking({
        let path = path.clone();
        move || std::fs::read(path)
    })
    .await
    {
        Ok(Ok(bytes)) => secured(HttpResponse::Ok())
            .content_type(content_type(&path))
            .header(
                "cache-control",
                if immutable {
                    "public, max-age=31536000, immutable"
                } else {
                    "no-cache"
                },
            )
            .body(bytes),
        _ if rel == Path::new("index.html") => not_built(root),
        _ => secured(HttpResponse::NotFound())
            .content_type("text/plain; charset=utf-8")
            .body("not found"),
    }
}

pub(super) async fn index(console: State) -> HttpResponse {
    send(&console.assets, Path::new("index.html")).await
}

/// A file under the console's directory: plain names only, no way out.
fn safe_relative(tail: &str) -> Option<PathBuf> {
    let p = Path::new(tail);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) if !s.to_string_lossy().starts_with('.') => out.push(s),
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

pub(super) async fn file(console: State, req: HttpRequest) -> HttpResponse {
    let tail = req.match_info().query("file").to_string();
    match safe_relative(&tail) {
        Some(rel) => send(&console.assets, &rel).await,
        None => secured(HttpResponse::NotFound())
            .content_type("text/plain; charset=utf-8")
            .body("not found"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside() {
        assert_eq!(
            safe_relative("assets/index-abc.js"),
            Some(PathBuf::from("assets/index-abc.js"))
        );
        assert_eq!(safe_relative("../etc/passwd"), None);
        assert_eq!(safe_relative("/etc/passwd"), None);
        assert_eq!(safe_relative("assets/../../x"), None);
        assert_eq!(safe_relative(".env"), None);
        assert_eq!(safe_relative(""), None);
    }
}
