//! A real, independently written OIDC issuer for tests: the npm package
//! `oauth2-mock-server` on loopback (`fixtures/oidc-issuer/issuer.cjs`,
//! installed under the user's cache by `scripts/install-node-tools.sh`),
//! driven over its stdin and stdout. Without Node or the package the tests
//! that use it fail; they never skip. Shared by the orchestrator's OIDC and
//! login tests and the system tests' `login.rs`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::OnceLock;

use serde_json::Value;

pub fn root() -> PathBuf {
    // The workspace root, from either crate's manifest folder.
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .find(|d| d.join("scripts/install-node-tools.sh").is_file())
        .expect("the workspace root")
        .to_path_buf()
}

/// The issuer's node_modules, installed once per test binary.
fn node_modules() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let script = root().join("scripts/install-node-tools.sh");
        let out = Command::new(&script)
            .arg(root().join("orchestrator/tests/fixtures/oidc-issuer"))
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("could not run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed ({}): the OIDC issuer these tests need (oauth2-mock-server, npm) is not installed",
            script.display(),
            out.status
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let dir = PathBuf::from(text.lines().last().expect("the script prints a folder"));
        assert!(
            dir.join("oauth2-mock-server").is_dir(),
            "{} holds no oauth2-mock-server",
            dir.display()
        );
        dir
    })
}

/// A running oauth2-mock-server, stopped on drop.
pub struct TestIssuer {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    pub url: String,
}

impl TestIssuer {
    pub fn start() -> TestIssuer {
        let script = root().join("orchestrator/tests/fixtures/oidc-issuer/issuer.cjs");
        let mut child = Command::new("node")
            .arg(&script)
            .env("NODE_PATH", node_modules())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("could not start node {}: {e}", script.display()));
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let hello: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the issuer did not start ({e}): {line:?}"));
        let url = hello["issuer"].as_str().unwrap().to_string();
        TestIssuer {
            child,
            stdin,
            stdout,
            url,
        }
    }

    pub fn ask(&mut self, request: Value) -> Value {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{request}").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let answer: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the issuer answered {line:?} ({e})"));
        assert!(answer.get("error").is_none(), "the issuer: {answer}");
        answer
    }

    pub fn token_of(&mut self, request: Value) -> String {
        self.ask(request)["token"].as_str().unwrap().to_string()
    }
}

impl Drop for TestIssuer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
