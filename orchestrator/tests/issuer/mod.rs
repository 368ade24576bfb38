//! Independently written OIDC and OAuth servers for tests, run by Node from
//! the fixtures under `orchestrator/tests/fixtures/` (their npm packages
//! installed under the user's cache by `scripts/install-node-tools.sh`) and
//! driven one JSON line at a time over stdin and stdout. Without Node or
//! the packages the tests that use them fail; they never skip.
//!
//! [`TestIssuer`] is the npm package `oauth2-mock-server`, an OIDC issuer
//! (discovery, JWKS, tokens with the claims asked for), shared by the
//! orchestrator's OIDC and login tests and the system tests. [`NodeScript`]
//! runs any fixture (`device_flow.rs` runs `oidc-provider` with it).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;

use serde_json::Value;

pub fn root() -> PathBuf {
    // The workspace root, from either crate's manifest folder.
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .find(|d| d.join("scripts/install-node-tools.sh").is_file())
        .expect("the workspace root")
        .to_path_buf()
}

/// The node_modules of the fixture folder `fixture` (relative to the
/// workspace root), which must hold `package`; installed once per test
/// binary and fixture.
fn node_modules(fixture: &str, package: &str) -> PathBuf {
    static DIRS: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut dirs = DIRS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(dir) = dirs.get(fixture) {
        return dir.clone();
    }
    let script = root().join("scripts/install-node-tools.sh");
    let out = Command::new(&script)
        .arg(root().join(fixture))
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}): {package} (npm), which these tests need, is not installed",
        script.display(),
        out.status
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let dir = PathBuf::from(text.lines().last().expect("the script prints a folder"));
    assert!(
        dir.join(package).is_dir(),
        "{} holds no {package}",
        dir.display()
    );
    dirs.insert(fixture.to_string(), dir.clone());
    dir
}

/// A fixture script running under Node, stopped on drop. Its first line
/// on stdout is a JSON hello; then each request line gets one answer line.
pub struct NodeScript {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// The first line the script printed.
    pub hello: Value,
    package: &'static str,
}

impl NodeScript {
    /// Runs `fixture`/`script` with `package` installed and `env` set;
    /// the script's stderr is shown unless `quiet`.
    pub fn start(
        fixture: &str,
        script: &str,
        package: &'static str,
        env: &[(&str, String)],
        quiet: bool,
    ) -> NodeScript {
        let path = root().join(fixture).join(script);
        let mut child = Command::new("node")
            .arg(&path)
            .env("NODE_PATH", node_modules(fixture, package))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(if quiet {
                Stdio::null()
            } else {
                Stdio::inherit()
            })
            .spawn()
            .unwrap_or_else(|e| panic!("could not start node {}: {e}", path.display()));
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let hello: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{package} did not start ({e}): {line:?}"));
        NodeScript {
            child,
            stdin,
            stdout,
            hello,
            package,
        }
    }

    /// One request (blocking: call it off the runtime's threads, or while
    /// what it answers runs on another task); an answer with an `error`
    /// fails the test.
    pub fn ask(&mut self, request: Value) -> Value {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{request}").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let answer: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{} answered {line:?} ({e})", self.package));
        assert!(answer.get("error").is_none(), "{}: {answer}", self.package);
        answer
    }
}

impl Drop for NodeScript {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running oauth2-mock-server, stopped on drop.
pub struct TestIssuer {
    node: NodeScript,
    pub url: String,
}

impl TestIssuer {
    pub fn start() -> TestIssuer {
        let node = NodeScript::start(
            "orchestrator/tests/fixtures/oidc-issuer",
            "issuer.cjs",
            "oauth2-mock-server",
            &[],
            false,
        );
        let url = node.hello["issuer"].as_str().unwrap().to_string();
        TestIssuer { node, url }
    }

    pub fn ask(&mut self, request: Value) -> Value {
        self.node.ask(request)
    }

    pub fn token_of(&mut self, request: Value) -> String {
        self.ask(request)["token"].as_str().unwrap().to_string()
    }
}
