//! The repository contract's steps, driven through a [`Session`] the same
//! way whatever the driver: set up `/var/run/ci` on the repository's
//! snapshot, `mk prepare-runtime` as root in the OS, the target in the
//! container named by `CONTAINERIMAGE` (podman in the OS, the repository
//! bind-mounted as its working directory), and after a pass the artifact
//! rules, the artifacts collected and `post-test`. The OS layout it relies
//! on is the drivers' contract ([`crate::driver`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use reprise_protocol::digest::Sha256Digest;
use reprise_protocol::manifest::Phase;

use crate::driver::{
    ARTIFACTS, CI, CRONTAB, OS_HELPER, OS_MK, OS_PATH, REPO, SNAPSHOT, Session, Stream,
    test_command,
};
use crate::error::RunError;
use crate::inputs::Keyed;
use crate::recorder::{RecordError, Recorder};
use crate::redact::Patterns;
use crate::ui::Ui;

/// What the steps did.
#[derive(Debug)]
pub struct Ran {
    /// Exit status of the test command.
    pub exit_code: i32,
    /// The tests' output record, in the run's work folder.
    pub record: crate::recorder::Recorded,
    pub phases: Vec<Phase>,
    /// The collected artifacts on the host, after a pass.
    pub artifacts: Option<std::path::PathBuf>,
    /// [`Session::settle_snapshot`] already ran.
    pub settled: bool,
    /// What prepare-runtime wrote to `/var/run/ci/crontab`.
    pub crontab: Option<String>,
    /// The id of the container image the tests ran in.
    pub container_image: Option<Sha256Digest>,
}

/// What the steps need besides the session.
#[derive(Debug)]
pub struct StepInputs<'a> {
    pub keyed: &'a Keyed,
    pub target: &'a str,
    /// Whether the test container gets the network.
    pub network: bool,
    /// Whether preparation (base-image, prepare-runtime, post-test) gets
    /// the OS's network (`[network] prepare` in reprise.toml).
    pub prepare_network: bool,
    pub secrets: &'a [(String, String)],
    /// The run's work folder on the host (artifacts are collected there).
    pub work: &'a Path,
    /// Whether the mkfile defines these targets (directly or by `ci.mk`).
    pub has_prepare_runtime: bool,
    pub has_post_test: bool,
    /// The user's terminal, when it shows colour ([`colour_env`]).
    pub colour_term: Option<&'a str>,
}

/// Runs the steps; `phase` reports each one as it ends.
pub async fn run<S: Session>(
    session: &S,
    inputs: &StepInputs<'_>,
    ui: &dyn Ui,
) -> Result<Ran, RunError> {
    let mut phases = Vec::new();
    let phase = |name: &str, since: Instant, phases: &mut Vec<Phase>| {
        let took = since.elapsed();
        ui.phase(name, took);
        phases.push(Phase {
            name: name.into(),
            ms: took.as_millis() as u64,
        });
    };
    let secret_values = Patterns::new(inputs.secrets);
    let mut env: BTreeMap<String, String> = inputs.keyed.inputs.env.clone();
    env.extend(inputs.secrets.iter().cloned());
    env.insert("PATH".into(), OS_PATH.into());

    // prepare-runtime, as root in the OS, from the repository root. The
    // snapshot holds podman's storage and /var/run/ci (a tmpfs otherwise),
    // so container images and cache/ persist; env/ starts empty every run;
    // artifacts/ is the folder the driver collects.
    let t = Instant::now();
    ui.begin("prepare-runtime");
    // Preparation without the network (`[network] prepare = false`): the
    // OS's card goes down, its default route kept aside for a run that
    // gives the tests the network.
    let offline = if inputs.prepare_network {
        ""
    } else {
        "{ [ ! -e /sys/class/net/eth0 ] || { set -- $(ip route show default) && \
           echo \"${3:-}\" > /run/reprise-gateway && ip link set eth0 down; }; } && "
    };
    // The rest in one process, Reprise's helper (`reprise-guest setup`),
    // not one per command: folders, podman's storage and /run/ci from the
    // snapshot, env/ and artifacts/ anew.
    let setup = format!(
        "{os}{offline}{OS_HELPER} setup {os_steps} \
         mkdir {SNAPSHOT}/containers mkdir {SNAPSHOT}/ci mkdir /var/lib/containers \
         bind {SNAPSHOT}/containers /var/lib/containers link {SNAPSHOT}/ci /run/ci \
         rm {CI}/env rm {CI}/artifacts rm {CRONTAB} \
         mkdir {CI}/env mkdir {CI}/cache mkdir {ARTIFACTS} link {ARTIFACTS} {CI}/artifacts",
        os = session.os_setup(),
        os_steps = session.os_steps().join(" "),
    );
    // /var/run/ci/env: each file a variable of the container; and the
    // crontab. Listed by the same command as prepare-runtime (a process
    // start costs time under TCG): mk's output goes to stderr, shown, and
    // the listing to stdout, read here.
    // A run that asked for the network gives it back to the tests.
    let online = if inputs.network && !inputs.prepare_network {
        "{ [ ! -e /sys/class/net/eth0 ] || { ip link set eth0 up && gw=$(cat /run/reprise-gateway) && \
           { [ -z \"$gw\" ] || ip route replace default via \"$gw\"; }; }; } && "
    } else {
        ""
    };
    let list = format!(
        "{online}cd {CI}/env && for f in *; do [ -f \"$f\" ] || continue; printf '%s\\0' \"$f\"; cat \"$f\"; printf '\\0'; done; \
         if [ -f {CRONTAB} ]; then printf '%s\\0' {CRONTAB}; head -c {max} {CRONTAB}; printf '\\0'; fi",
        max = crate::schedule::MAX_CRONTAB + 1
    );
    let prepare = match inputs.has_prepare_runtime {
        true => format!("{OS_MK} prepare-runtime >&2; c=$?; [ $c -eq 0 ] || exit $c; "),
        false => String::new(),
    };
    // All of it in one command (one more is a round trip to the guest and
    // a shell under TCG): the set-up says it is done with a byte on stdout
    // before anything of the repository's runs, so a failed set-up is
    // told from a failed prepare-runtime. The shell leaves the repository
    // while the set-up may mount another disk where it is (a warm guest's
    // data disk), and comes back to the one mounted now.
    let argv = shell(&format!(
        "cd / || exit 1; {setup} || exit 1; cd {REPO} || exit 1; printf '{SET_UP}'; {prepare}{list}"
    ));
    let mut shown = Recorder::shown(&secret_values, ui);
    let mut said = Vec::new();
    let mut listed = Vec::new();
    let mut whole = true;
    ui.command(&argv);
    let code = session
        .exec(&argv, &env, &mut |stream: Stream, b: &[u8]| match stream {
            Stream::Stdout => whole &= keep(&mut listed, b),
            Stream::Stderr => {
                if listed.is_empty() && said.len() < SETUP_SAID {
                    said.extend_from_slice(&b[..b.len().min(SETUP_SAID - said.len())]);
                }
                shown.feed(Stream::Stderr, b)
            }
        })
        .await?;
    let _ = shown.finish();
    let Some(listing) = listed.strip_prefix(SET_UP.as_bytes()) else {
        return Err(RunError::Infra(format!(
            "setting up {CI} failed (status {code}): {}",
            String::from_utf8_lossy(&secret_values.mask(&said))
        )));
    };
    if code != 0 && inputs.has_prepare_runtime {
        return Err(RunError::Prepare {
            code,
            console: session.console_tail(),
        });
    }
    if !whole {
        return Err(RunError::Contract(format!(
            "the files in {CI}/env and {CRONTAB} hold more than {} MiB together",
            MAX_LISTED >> 20
        )));
    }
    phase("prepare-runtime", t, &mut phases);

    let (ci_env, crontab) = parse_env_listing(listing);
    let image = ci_env.get("CONTAINERIMAGE").cloned().ok_or_else(|| {
        RunError::Contract(format!(
            "prepare-runtime did not write {CI}/env/CONTAINERIMAGE (include </usr/lib/reprise/ci.mk and set CONTAINERIMAGE, or write the file in prepare-runtime)"
        ))
    })?;

    // The target, in the container, with the repository as working directory.
    let t = Instant::now();
    ui.begin(inputs.target);
    let mut container_env = env.clone();
    container_env.remove("PATH");
    container_env.extend(ci_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    if let Some(term) = inputs.colour_term {
        for (k, v) in colour_env(term) {
            container_env.entry(k.into()).or_insert(v);
        }
    }
    let mut argv = test_command(inputs.network, &image, inputs.target, &container_env);
    // podman itself needs a PATH; the container does not get this one.
    let mut podman_env = container_env.clone();
    podman_env.insert("PATH".into(), OS_PATH.into());
    let record_path = inputs.work.join("output.rec");
    let mut recorder = Recorder::to_file(
        &secret_values,
        &record_path,
        reprise_protocol::manifest::MAX_RECORD_BYTES,
        ui,
    )
    .map_err(|e| recording_failed(&record_path, e))?;
    ui.command(&argv);
    let exit_code = session
        .exec(&argv, &podman_env, &mut |s, b| recorder.feed(s, b))
        .await?;
    let record = match recorder.finish() {
        Ok(record) => record.expect("a recorder to a file records"),
        Err(RecordError::Io(e)) => return Err(recording_failed(&record_path, e)),
        Err(RecordError::TooLarge(over)) => return Err(RunError::OutputTooLarge(over)),
    };
    // podman's own failures exit 125; only then is it worth asking (one
    // podman start costs about a second under TCG) whether the image is
    // missing, which is the repository's mistake and not a test failure.
    if exit_code == 125 {
        argv = ["podman", "image", "exists", &image]
            .map(String::from)
            .to_vec();
        let exists = capture(session, &argv, &env, ui).await?;
        if !exists.success() {
            return Err(RunError::Contract(format!(
                "CONTAINERIMAGE names '{image}', which is not an image in the OS's podman (does base-image build it with that name?)"
            )));
        }
    }
    phase(inputs.target, t, &mut phases);

    // After a pass, one command does the rest in the OS, in the design's
    // order (a process start costs time under TCG): the image index, the
    // artifact rules, post-test, then the settles, artifacts folder and
    // snapshot; the artifacts are copied out after it. After a failure,
    // only the index is read.
    let t = Instant::now();
    let finished = if exit_code == 0 {
        ui.begin("collect");
        Some(finish(session, inputs, &env, &secret_values, ui).await?)
    } else {
        None
    };
    let index = match &finished {
        Some(f) => f.index.clone(),
        None => {
            let argv = shell(&format!(
                "for f in {IMAGE_INDEXES}; do [ -f \"$f\" ] && cat \"$f\"; done; exit 0"
            ));
            capture(session, &argv, &env, ui).await?.stdout
        }
    };
    let container_image = match image_id_from_index(&index, &image) {
        Some(id) => Some(id),
        // A short name or a digest: podman resolves it.
        None => {
            let argv = ["podman", "image", "inspect", "--format", "{{.Id}}", &image]
                .map(String::from)
                .to_vec();
            let out = capture(session, &argv, &env, ui).await?;
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .and_then(|l| l.trim().parse::<Sha256Digest>().ok())
        }
    };
    let mut artifacts = None;
    let mut settled = false;
    if let Some(finished) = finished {
        let host = inputs.work.join("artifacts");
        session.collect(&host, finished.artifacts_settled).await?;
        artifacts = Some(host);
        settled = finished.snapshot_settled;
        phase("collect", t, &mut phases);
    }
    Ok(Ran {
        exit_code,
        record,
        phases,
        artifacts,
        settled,
        crontab,
        container_image,
    })
}

/// Where podman keeps its image index, one file per storage driver.
const IMAGE_INDEXES: &str = "/var/lib/containers/storage/*-images/images.json";

/// The id of the image `name` in podman's image index (`images.json`),
/// when `name` is fully qualified (a registry or `localhost` first, a tag
/// or `latest`) and exactly one image carries it; `None` leaves it to
/// podman (a short name goes through podman's search registries).
fn image_id_from_index(index: &[u8], name: &str) -> Option<Sha256Digest> {
    if name.contains('@') {
        return None;
    }
    let (domain, _) = name.split_once('/')?;
    if !(domain == "localhost" || domain.contains('.') || domain.contains(':')) {
        return None;
    }
    let last = name.rsplit('/').next()?;
    let full = match last.contains(':') {
        true => name.to_string(),
        false => format!("{name}:latest"),
    };
    let images: serde_json::Value = serde_json::from_slice(index).ok()?;
    let mut ids = images.as_array()?.iter().filter_map(|image| {
        let names = image.get("names")?.as_array()?;
        names
            .iter()
            .any(|n| n.as_str() == Some(full.as_str()))
            .then(|| image.get("id")?.as_str()?.parse::<Sha256Digest>().ok())
            .flatten()
    });
    let id = ids.next()?;
    ids.next().is_none().then_some(id)
}

fn shell(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

/// What tests that colour only on a terminal read to colour anyway: the
/// terminal's type and the force-colour switches of the common tools
/// (the `FORCE_COLOR` of Node and Python's tools, `CLICOLOR_FORCE`,
/// cargo's and pytest's own). A repository's own value wins.
pub fn colour_env(term: &str) -> [(&'static str, String); 5] {
    [
        ("TERM", term.to_string()),
        ("FORCE_COLOR", "1".into()),
        ("CLICOLOR_FORCE", "1".into()),
        ("CARGO_TERM_COLOR", "always".into()),
        ("PY_COLORS", "1".into()),
    ]
}

/// What the set-up command prints once the set-up is done, before the
/// repository's `prepare-runtime` runs.
const SET_UP: &str = "S";

/// The most of what a failed set-up printed that its error repeats.
const SETUP_SAID: usize = 4096;

/// The most kept of what a command of the steps prints on stdout for the
/// host to read (the `env/` listing, podman's image index): the
/// repository, root in the OS, decides how much that is.
const MAX_LISTED: usize = 16 << 20;

/// Appends `b` to `kept` up to [`MAX_LISTED`]; false once more came.
fn keep(kept: &mut Vec<u8>, b: &[u8]) -> bool {
    let room = MAX_LISTED.saturating_sub(kept.len());
    kept.extend_from_slice(&b[..b.len().min(room)]);
    b.len() <= room
}

/// What [`finish`] found: the image index, and which settles it ran.
struct Finished {
    index: Vec<u8>,
    artifacts_settled: bool,
    snapshot_settled: bool,
}

/// Where the artifact rules' output waits in the OS, shown only if they
/// fail.
const ARTIFACT_LOG: &str = "/run/reprise-artifact-rules.log";

/// The most of the failed artifact rules' output their error holds.
const RULES_SAID: usize = 64 << 10;

/// After a pass, in one command: prints podman's image index, makes the
/// declared artifacts (`mk` of each, its output kept aside), runs
/// `post-test` if they were made (its output shown as it comes), settles
/// the artifacts folder and the snapshot, and prints the two statuses and,
/// if the rules failed, their output. A failed rule or `post-test` is the
/// repository's error.
async fn finish<S: Session>(
    session: &S,
    inputs: &StepInputs<'_>,
    env: &BTreeMap<String, String>,
    secrets: &Patterns,
    ui: &dyn Ui,
) -> Result<Finished, RunError> {
    let declared = &inputs.keyed.revision.config.artifacts;
    let mut make: Vec<String> = Vec::new();
    if !declared.is_empty() {
        make.push(OS_MK.into());
        make.extend(declared.iter().map(|path| format!("{CI}/artifacts/{path}")));
    }
    let post_test = match inputs.has_post_test {
        true => format!("[ $a -ne 0 ] || {{ {OS_MK} post-test >&2; p=$?; }}; "),
        false => String::new(),
    };
    let settle_artifacts = session.settle_artifacts();
    let settle_snapshot = session.settle_snapshot();
    let settles: String = [&settle_artifacts, &settle_snapshot]
        .into_iter()
        .flatten()
        .map(|s| format!("{s}; "))
        .collect();
    let mut argv = shell(&format!(
        "for f in {IMAGE_INDEXES}; do [ -f \"$f\" ] && cat \"$f\"; done; printf '\\0'; \
         a=0; p=0; [ $# -eq 0 ] || {{ \"$@\" > {ARTIFACT_LOG} 2>&1; a=$?; }}; {post_test}\
         {settles}printf '%d %d\\0' $a $p; [ $a -eq 0 ] || head -c {RULES_SAID} {ARTIFACT_LOG}; exit 0"
    ));
    argv.push("sh".into());
    argv.extend(make.iter().cloned());
    let mut shown = Recorder::shown(secrets, ui);
    let mut out = IndexThenRest::default();
    ui.command(&argv);
    let code = session
        .exec(&argv, env, &mut |stream: Stream, b: &[u8]| match stream {
            Stream::Stdout => out.feed(b),
            Stream::Stderr => shown.feed(Stream::Stderr, b),
        })
        .await?;
    let _ = shown.finish();
    let (index, rest) = out.finish();
    let Some(rest) = rest else {
        return Err(ended_early(code));
    };
    let mut fields = rest.splitn(2, |b| *b == 0);
    let statuses = fields.next().and_then(|s| std::str::from_utf8(s).ok());
    let log = fields.next().unwrap_or_default();
    let parsed = statuses
        .filter(|_| code == 0)
        .and_then(|s| s.split_once(' '))
        .and_then(|(a, p)| Some((a.parse::<i32>().ok()?, p.parse::<i32>().ok()?)));
    let Some((artifacts, post)) = parsed else {
        return Err(ended_early(code));
    };
    if artifacts != 0 {
        let names: Vec<&str> = declared.iter().map(|a| a.as_str()).collect();
        return Err(RunError::Contract(format!(
            "making the artifacts {} (`mk {}`) failed with status {artifacts}:\n{}",
            names.join(", "),
            make.get(1..).unwrap_or_default().join(" "),
            String::from_utf8_lossy(&secrets.mask(log))
        )));
    }
    if post != 0 {
        return Err(RunError::Contract(format!(
            "`mk post-test` failed with status {post}"
        )));
    }
    Ok(Finished {
        index,
        artifacts_settled: settle_artifacts.is_some(),
        snapshot_settled: settle_snapshot.is_some(),
    })
}

/// The finishing command's stdout as it comes: podman's image index up to
/// the first NUL, then the rest, each kept up to [`MAX_LISTED`]. An index
/// larger than that is dropped whole (podman then names the image, as for
/// a short name) and the rest is still read.
struct IndexThenRest {
    index: Vec<u8>,
    index_whole: bool,
    rest: Option<Vec<u8>>,
}

impl Default for IndexThenRest {
    fn default() -> Self {
        IndexThenRest {
            index: Vec::new(),
            index_whole: true,
            rest: None,
        }
    }
}

impl IndexThenRest {
    fn feed(&mut self, b: &[u8]) {
        match &mut self.rest {
            Some(rest) => _ = keep(rest, b),
            None => {
                let end = b.iter().position(|c| *c == 0);
                let (head, tail) = b.split_at(end.unwrap_or(b.len()));
                self.index_whole = self.index_whole && keep(&mut self.index, head);
                if end.is_some() {
                    let mut rest = Vec::new();
                    keep(&mut rest, &tail[1..]);
                    self.rest = Some(rest);
                }
            }
        }
    }

    /// The index (empty if it was too large) and the rest (`None` if no
    /// NUL ended the index).
    fn finish(mut self) -> (Vec<u8>, Option<Vec<u8>>) {
        if !self.index_whole {
            self.index.clear();
        }
        (self.index, self.rest)
    }
}

/// The finishing command ended without saying how its steps went.
fn ended_early(code: i32) -> RunError {
    RunError::Infra(format!(
        "the command that makes the artifacts and runs post-test ended early (status {code})"
    ))
}

/// Runs `argv` in the OS and captures its output, shown first with `-v`.
async fn capture<S: Session>(
    session: &S,
    argv: &[String],
    env: &BTreeMap<String, String>,
    ui: &dyn Ui,
) -> Result<crate::driver::Output, RunError> {
    ui.command(argv);
    session.capture(argv, env).await
}

/// A recording that could not be written: a full disk is said so.
fn recording_failed(path: &Path, e: std::io::Error) -> RunError {
    if e.raw_os_error() == Some(nix::libc::ENOSPC) {
        RunError::Store(crate::store::StoreError::Full(path.to_path_buf()))
    } else {
        RunError::Infra(format!(
            "recording the tests' output in {}: {e}",
            path.display()
        ))
    }
}

/// Parses `name\0value\0` pairs; one trailing newline of a value is dropped
/// (files written with `echo`). A pair named [`CRONTAB`] is the crontab.
fn parse_env_listing(data: &[u8]) -> (BTreeMap<String, String>, Option<String>) {
    let mut out = BTreeMap::new();
    let mut crontab = None;
    let mut parts = data.split(|b| *b == 0);
    while let (Some(name), Some(value)) = (parts.next(), parts.next()) {
        let name = String::from_utf8_lossy(name).into_owned();
        let value = String::from_utf8_lossy(value);
        if name == CRONTAB {
            crontab = Some(value.into_owned());
            continue;
        }
        if !reprise_protocol::repo_config::valid_env_name(&name) {
            continue;
        }
        out.insert(name, value.strip_suffix('\n').unwrap_or(&value).to_string());
    }
    (out, crontab)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_id_comes_from_the_index_only_for_a_name_that_names_one_image() {
        let a = "a".repeat(64);
        let b = "b".repeat(64);
        let index = format!(
            r#"[{{"id":"{a}","names":["localhost/hello-test:latest"]}},
               {{"id":"{b}","names":["quay.io/x/y:1","quay.io/x/dup:latest"]}},
               {{"id":"{a}","names":["quay.io/x/dup:latest"]}}]"#
        );
        let id = |name: &str| image_id_from_index(index.as_bytes(), name).map(|d| d.hex());
        assert_eq!(id("localhost/hello-test"), Some(a.clone()));
        assert_eq!(id("localhost/hello-test:latest"), Some(a.clone()));
        assert_eq!(id("quay.io/x/y:1"), Some(b.clone()));
        assert_eq!(id("quay.io/x/y"), None, "no :latest of it");
        assert_eq!(id("quay.io/x/dup"), None, "two images carry the name");
        assert_eq!(
            id("hello-test"),
            None,
            "a short name is podman's to resolve"
        );
        assert_eq!(id("library/x"), None, "no registry: a short name");
        assert_eq!(id(&format!("localhost/hello-test@sha256:{a}")), None);
        assert_eq!(image_id_from_index(b"not json", "localhost/a"), None);
        assert_eq!(image_id_from_index(b"", "localhost/a"), None);
    }

    #[test]
    fn the_finishing_output_splits_at_the_first_nul_whatever_the_pieces() {
        let read = |pieces: &[&[u8]]| {
            let mut out = IndexThenRest::default();
            for p in pieces {
                out.feed(p);
            }
            out.finish()
        };
        let whole = read(&[b"[{\"id\"", b":1}]\x000 0\x00", b"log"]);
        assert_eq!(
            whole,
            (b"[{\"id\":1}]".to_vec(), Some(b"0 0\x00log".to_vec()))
        );
        assert_eq!(read(&[b"idx", b"\x00", b"1 0"]).1, Some(b"1 0".to_vec()));
        assert_eq!(read(&[b"no nul"]), (b"no nul".to_vec(), None));
        // An index past the bound is dropped, and what follows it is read.
        let big = vec![b'x'; MAX_LISTED / 2 + 1];
        let (index, rest) = read(&[&big, &big, b"\x000 0"]);
        assert!(index.is_empty());
        assert_eq!(rest, Some(b"0 0".to_vec()));
        // The rest is bounded too.
        let (_, rest) = read(&[b"\x00", &big, &big]);
        assert_eq!(rest.map(|r| r.len()), Some(MAX_LISTED));
    }

    #[test]
    fn env_listing_becomes_variables() {
        let data = b"CONTAINERIMAGE\0localhost/x\n\0EMPTY\0\0bad name\0v\0/var/run/ci/crontab\0* * * * * lint\n\0";
        let (env, crontab) = parse_env_listing(data);
        assert_eq!(crontab.as_deref(), Some("* * * * * lint\n"));
        assert_eq!(
            env.get("CONTAINERIMAGE").map(String::as_str),
            Some("localhost/x")
        );
        assert_eq!(env.get("EMPTY").map(String::as_str), Some(""));
        assert_eq!(env.len(), 2);
    }
}
