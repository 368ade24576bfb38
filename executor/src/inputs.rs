//! A run's inputs: the revision resolved, the run key assembled from it,
//! the request and the environment (taken as a map, so the decision is a
//! function of its arguments), and the secrets' values.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use reprise_protocol::key::{KEY_VERSION, KeyInputs};

use crate::error::RunError;
use crate::repo::{Checkout, Revision};
use crate::snapshots::RepoId;

/// What the key is computed from, besides the repository.
#[derive(Debug, Clone)]
pub struct KeyRequest {
    /// A folder inside the checkout.
    pub dir: PathBuf,
    /// The revision (default: HEAD).
    pub rev: Option<String>,
    pub target: String,
    /// Counted variables given on the command line.
    pub cli_env: Vec<(String, String)>,
    /// The driver class (`qemu`, `podman`).
    pub driver: String,
    /// Whether the tests have the network.
    pub network: bool,
}

impl KeyRequest {
    /// The default request in `dir`: HEAD, target `test`, the qemu driver,
    /// no network.
    pub fn at(dir: &Path) -> KeyRequest {
        KeyRequest {
            dir: dir.to_path_buf(),
            rev: None,
            target: "test".into(),
            cli_env: Vec::new(),
            // The default driver's class (`DriverKind::Qemu`; a test of
            // the driver module holds them equal).
            driver: reprise_protocol::key::DRIVER_QEMU.into(),
            network: false,
        }
    }
}

/// The process's environment, as the map the functions here take.
pub fn process_env() -> BTreeMap<String, String> {
    std::env::vars().collect()
}

/// A resolved revision and its key.
#[derive(Debug)]
pub struct Keyed {
    pub checkout_root: PathBuf,
    pub revision: Revision,
    pub inputs: KeyInputs,
}

impl Keyed {
    /// The repository whose snapshots a run of this revision uses: its
    /// namespace and its anchor ([`Checkout::anchor`]), read from the
    /// checkout now (a walk of the history, which a replay never needs).
    pub fn repo_id(&self) -> Result<RepoId, RunError> {
        let anchor = Checkout::discover(&self.checkout_root)?.anchor(&self.revision.commit)?;
        Ok(RepoId {
            namespace: self.inputs.namespace.clone(),
            anchor,
        })
    }
}

/// Resolves the revision and computes the key, reading nothing but git
/// objects (the tree id already hashes every file) and `env` (the declared
/// counted variables' values).
pub fn compute_key(req: &KeyRequest, env: &BTreeMap<String, String>) -> Result<Keyed, RunError> {
    compute_key_in(&Checkout::discover(&req.dir)?, req, env)
}

/// [`compute_key`] in `checkout`, the repository that holds `req.dir`
/// (opened once by a caller that reads more of it).
pub fn compute_key_in(
    checkout: &Checkout,
    req: &KeyRequest,
    env: &BTreeMap<String, String>,
) -> Result<Keyed, RunError> {
    let revision = checkout.resolve(req.rev.as_deref())?;
    let mut counted = BTreeMap::new();
    for name in &revision.config.env {
        if let Some(value) = env.get(name) {
            counted.insert(name.clone(), value.clone());
        }
    }
    for (name, value) in &req.cli_env {
        if revision.config.secrets.contains(name) {
            return Err(RunError::Usage(format!(
                "{name} is declared secret in reprise.toml; it cannot be counted"
            )));
        }
        counted.insert(name.clone(), value.clone());
    }
    let inputs = KeyInputs {
        version: KEY_VERSION,
        namespace: revision.namespace.clone(),
        tree: revision.tree.clone(),
        target: req.target.clone(),
        env: counted,
        // The recipe's hash, not the disk's: every machine that builds the
        // same recipe must agree on the key (see ARCHITECTURE.md).
        image_digest: format!(
            "recipe:{}",
            crate::image::recipe_hash(crate::image::RECIPE_FILES)
        ),
        driver: req.driver.clone(),
        network: req.network,
    };
    Ok(Keyed {
        checkout_root: checkout.root(),
        revision,
        inputs,
    })
}

/// Whether the working tree holds changes a run does not see (modified or
/// untracked files, reprise's own artifacts folder aside), found on a
/// thread while the run looks up, fetches and replays: in a large tree
/// the check costs more than a replay (about 345 ms for 100,000 files
/// here, against 25 ms).
#[derive(Debug)]
pub struct DirtyCheck(Option<std::thread::JoinHandle<bool>>);

impl DirtyCheck {
    /// Starts the check of the checkout at `root`, `ignore` aside.
    pub fn start(root: &Path, ignore: &Path) -> DirtyCheck {
        let (root, ignore) = (root.to_path_buf(), ignore.to_path_buf());
        let check = move || Checkout::discover(&root).is_ok_and(|c| c.is_dirty(Some(&ignore)));
        DirtyCheck(
            std::thread::Builder::new()
                .name("dirty-check".into())
                .spawn(check)
                .ok(),
        )
    }

    /// Waits for the check and, the first time it is asked, says whether
    /// there are changes that `what` (the run, the replayed result)
    /// ignores.
    pub fn note(&mut self, what: &str, ui: &dyn crate::ui::Ui) {
        if let Some(check) = self.0.take()
            && check.join().unwrap_or(false)
        {
            ui.note(&format!(
                "the working tree has uncommitted changes; they are ignored ({what})"
            ));
        }
    }
}

/// The secrets' values from `env`: those the repository declares (skipped
/// if unset) and those given with `--secret` (an error if unset).
pub fn secret_values(
    revision: &Revision,
    cli: &[String],
    env: &BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, RunError> {
    let mut out = Vec::new();
    for name in &revision.config.secrets {
        if let Some(v) = env.get(name) {
            out.push((name.clone(), v.clone()));
        }
    }
    for name in cli {
        if revision.config.env.contains(name) {
            return Err(RunError::Usage(format!(
                "{name} is declared counted in reprise.toml; it cannot be a secret"
            )));
        }
        match env.get(name) {
            Some(v) => out.push((name.clone(), v.clone())),
            None => {
                return Err(RunError::Usage(format!(
                    "--secret {name}: {name} is not set in the environment"
                )));
            }
        }
    }
    Ok(out)
}
