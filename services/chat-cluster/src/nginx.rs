//! The real `nginx/nginx.conf`, rewritten for loopback, and the nginx process that serves it.
//!
//! The config marks the lines that differ between compose and a local cluster with
//! `# @name` comments; only those lines are replaced, so the local cluster tests the very
//! config that compose ships.

use crate::ClusterError;
use std::path::Path;

/// Rewrites `config` to proxy to `gateway_ports` on 127.0.0.1, listen on `listen_port`, and
/// keep its logs and temporary files under `dir`.
pub fn rewrite(
    config: &str,
    gateway_ports: &[u16],
    listen_port: u16,
    dir: &Path,
) -> Result<String, ClusterError> {
    let dir = dir.display();
    let mut out = String::with_capacity(config.len() + 256);
    let mut seen = [false; 4];
    for line in config.lines() {
        let indent: String = line.chars().take_while(|c| c.is_whitespace()).collect();
        if line.contains("# @gateway_upstream") {
            seen[0] = true;
            // Keep the server parameters (max_fails, ...) after the address.
            let params = params_after_address(line, "server");
            if gateway_ports.is_empty() {
                // nginx needs at least one server; a closed port answers nothing.
                out.push_str(&format!("{indent}server 127.0.0.1:9 down;\n"));
            }
            for port in gateway_ports {
                out.push_str(&format!("{indent}server 127.0.0.1:{port}{params};\n"));
            }
        } else if line.contains("# @listen") {
            seen[1] = true;
            // Keep the socket parameters (sndbuf, ...) after the port.
            let params = params_after_address(line, "listen");
            out.push_str(&format!(
                "{indent}listen 127.0.0.1:{listen_port}{params};\n"
            ));
        } else if line.contains("# @error_log") {
            seen[2] = true;
            out.push_str(&format!("{indent}error_log {dir}/error.log warn;\n"));
        } else if line.contains("# @access_log") {
            seen[3] = true;
            out.push_str(&format!("{indent}access_log {dir}/access.log;\n"));
            out.push_str(&format!("{indent}client_body_temp_path {dir}/tmp/body;\n"));
            out.push_str(&format!("{indent}proxy_temp_path {dir}/tmp/proxy;\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    let names = ["@gateway_upstream", "@listen", "@error_log", "@access_log"];
    if let Some(i) = seen.iter().position(|s| !s) {
        return Err(ClusterError(format!(
            "nginx/nginx.conf has no line marked `# {}`: the local cluster cannot adapt it",
            names[i]
        )));
    }
    Ok(out)
}

/// The parameters after the address of a `DIRECTIVE ADDRESS PARAMS...; # @marker` line, with
/// a leading space when there are any.
fn params_after_address(line: &str, directive: &str) -> String {
    let statement = line.split('#').next().unwrap_or("").trim();
    let params = statement
        .strip_prefix(directive)
        .and_then(|rest| rest.trim().split_once(' '))
        .map(|(_, params)| params.trim().trim_end_matches(';').trim())
        .unwrap_or("");
    if params.is_empty() {
        String::new()
    } else {
        format!(" {params}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "error_log /var/log/nginx/error.log warn; # @error_log\nhttp {\n    access_log /var/log/nginx/access.log; # @access_log\n    upstream u {\n        least_conn;\n        server gateway:8080 max_fails=3 fail_timeout=10s; # @gateway_upstream\n    }\n    server {\n        listen 8080 sndbuf=128k; # @listen\n    }\n}\n";

    #[test]
    fn rewrites_only_the_marked_lines() {
        let out = rewrite(CONFIG, &[7001, 7002], 9000, Path::new("/tmp/c")).unwrap();
        assert!(out.contains("        server 127.0.0.1:7001 max_fails=3 fail_timeout=10s;\n"));
        assert!(out.contains("        server 127.0.0.1:7002 max_fails=3 fail_timeout=10s;\n"));
        assert!(out.contains("        listen 127.0.0.1:9000 sndbuf=128k;\n"));
        assert!(out.contains("error_log /tmp/c/error.log warn;"));
        assert!(out.contains("        least_conn;\n"));
        assert!(!out.contains("gateway:8080"));
    }

    #[test]
    fn lines_without_parameters_stay_without() {
        let config = CONFIG
            .replace(" max_fails=3 fail_timeout=10s;", ";")
            .replace(" sndbuf=128k;", ";");
        let out = rewrite(&config, &[7001], 9000, Path::new("/tmp/c")).unwrap();
        assert!(out.contains("        server 127.0.0.1:7001;\n"), "{out}");
        assert!(out.contains("        listen 127.0.0.1:9000;\n"), "{out}");
    }

    #[test]
    fn a_config_without_markers_is_refused() {
        let e = rewrite("http {}", &[1], 2, Path::new("/tmp")).unwrap_err();
        assert!(e.0.contains("@gateway_upstream"), "{e}");
    }
}
