//! What the benchmarks share: finding the workspace's binaries, medians and
//! their printing, a committed copy of `examples/hello`, and a large
//! stored result made straight through the library.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use reprise_executor::pipeline;
use reprise_executor::store::Store;
use reprise_protocol::manifest::{Outcome, Phase, Producer, ResultManifest};
use reprise_protocol::record::{self, StreamId};

/// The recorded output of [`store_large_result`].
pub const OUTPUT_BYTES: usize = 1 << 20;
/// The artifacts of [`store_large_result`], in 20 files.
pub const ARTIFACT_BYTES: usize = 20 << 20;

/// A binary of the workspace beside this one.
pub fn sibling_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe.parent().expect("bin dir").join(name);
    assert!(
        bin.is_file(),
        "{name} must sit beside {} (cargo build --release --workspace)",
        exe.display()
    );
    bin
}

/// What a benchmark does with an argument it does not take: `--help` or
/// `-h` prints `usage` and exits 0, anything else prints it beside the
/// argument and exits 2, the usual code for a usage error.
pub fn usage_exit(arg: &str, usage: &str) -> ! {
    if arg == "--help" || arg == "-h" {
        println!("{usage}");
        std::process::exit(0);
    }
    eprintln!("unknown argument {arg:?}\n{usage}");
    std::process::exit(2);
}

/// What a benchmark does with an argument whose value is missing or not
/// one it takes: says so beside `usage` and exits 2, as for an unknown
/// argument ([`usage_exit`]).
pub fn value_exit(arg: &str, needs: &str, usage: &str) -> ! {
    eprintln!("{arg} needs {needs}\n{usage}");
    std::process::exit(2);
}

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

pub fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=Bench",
            "-c",
            "user.email=bench@reprise.invalid",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Copies examples/hello into `dir` and commits it.
pub fn hello_repo(dir: &Path) {
    fs::create_dir_all(dir).expect("repo dir");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello");
    for entry in fs::read_dir(example).expect("examples/hello") {
        let entry = entry.expect("entry");
        fs::copy(entry.path(), dir.join(entry.file_name())).expect("copy");
    }
    git(dir, &["init", "-q", "-b", "main"]);
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", "hello"]);
}

/// `len` bytes that no compressor shrinks (xorshift64), the same for the
/// same `seed`.
pub fn incompressible(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

/// The 20 artifacts of [`store_large_result`], written into `dir` as
/// `artifact-<i>.bin`.
pub fn write_large_artifacts(dir: &Path) {
    fs::create_dir_all(dir).expect("artifacts dir");
    for i in 0..20u64 {
        let bytes = incompressible(0x9e37_79b9_7f4a_7c15 ^ i, ARTIFACT_BYTES / 20);
        fs::File::create(dir.join(format!("artifact-{i}.bin")))
            .and_then(|mut f| f.write_all(&bytes))
            .expect("artifact");
    }
}

/// A stored result of 1 MiB of output and 20 MiB of artifacts for the
/// repository in `repo`, committed straight through the library to the
/// store under `data` (an `XDG_DATA_HOME`), sealed by `sealer` if given.
/// Returns its key inputs.
pub fn store_large_result(
    repo: &Path,
    data: &Path,
    sealer: Option<&dyn reprise_executor::store::Sealer>,
) -> pipeline::Keyed {
    let mut rec = Vec::new();
    let line = b"ok some test passed with a reasonably long line of output\n";
    let mut written = 0;
    let mut at = 0;
    while written < OUTPUT_BYTES {
        let chunk: Vec<u8> = line.iter().copied().cycle().take(4096).collect();
        let stream = if at % 8 == 7 {
            StreamId::Stderr
        } else {
            StreamId::Stdout
        };
        record::push(&mut rec, stream, at, &chunk);
        written += chunk.len();
        at += 1;
    }
    let artifacts = data.join("staging-artifacts");
    write_large_artifacts(&artifacts);
    let keyed = store_result(repo, data, sealer, &rec, &artifacts);
    fs::remove_dir_all(&artifacts).expect("remove staging");
    keyed
}

/// A passed result of the output record `rec` and the files under
/// `artifacts` for the repository in `repo`, committed straight through the
/// library to the store under `data` (an `XDG_DATA_HOME`) as a real run
/// would, sealed by `sealer` if given. Returns its key inputs.
pub fn store_result(
    repo: &Path,
    data: &Path,
    sealer: Option<&dyn reprise_executor::store::Sealer>,
    rec: &[u8],
    artifacts: &Path,
) -> pipeline::Keyed {
    let keyed = pipeline::compute_key(
        &pipeline::KeyRequest::at(repo),
        &reprise_executor::inputs::process_env(),
    )
    .expect("key");
    let manifest = ResultManifest {
        version: reprise_protocol::manifest::MANIFEST_VERSION,
        key: keyed.inputs.key(),
        inputs: keyed.inputs.clone(),
        commit: keyed.revision.commit.clone(),
        outcome: Outcome::Passed,
        exit_code: 0,
        phases: vec![Phase {
            name: "total".into(),
            ms: 1,
        }],
        total_ms: 1,
        accel: "bench".into(),
        tool_version: "bench".into(),
        producer: Producer {
            host: "bench".into(),
            user: "bench".into(),
        },
        created_at: reprise_executor::store::now_secs(),
        snapshot: reprise_protocol::manifest::Snapshot::Fresh,
        output_sha256: reprise_protocol::digest::Sha256Digest::of(b""),
        output_blake3: None,
        output_bytes: 0,
        artifacts: Vec::new(),
        crontab: None,
        container_image: None,
    };
    Store::new(data.join("reprise/store"))
        .commit(manifest, rec, Some(artifacts), sealer)
        .expect("commit the result");
    keyed
}
