//! The dry-run driver: runs nothing, boots nothing. It prints the plan of
//! the qemu run the request describes: the key and its inputs, the image,
//! each step with where it would run, the mounts, the network, the secrets
//! by name, and what would be kept. The revision has passed
//! [`crate::check`] by then, so a plan is printed only for a valid run; an
//! invalid one ends with the contract's exit codes as a real run would.

use std::fmt::Write as _;

use std::path::Path;

use super::{ARTIFACTS, CI, OS_MK, SNAPSHOT, test_command};
use crate::accel::{self, Accel, AccelFacts};
use crate::check::Checked;
use crate::image::{ImageCache, RECIPE_FILES, recipe_hash};
use crate::inputs::Keyed;
use crate::snapshots::Snapshots;

/// What a plan is made of.
#[derive(Debug)]
pub struct PlanRequest<'a> {
    pub keyed: &'a Keyed,
    pub target: &'a str,
    pub network: bool,
    pub secrets: &'a [(String, String)],
    pub checked: &'a Checked,
    pub artifacts_dir: &'a Path,
    pub fresh: bool,
    pub accel: Option<Accel>,
}

/// The plan, as text.
pub fn plan(req: &PlanRequest<'_>) -> String {
    let keyed = req.keyed;
    let checked = req.checked;
    let mut out = String::new();
    let mut line = |s: String| {
        let _ = writeln!(out, "{s}");
    };
    line("plan of `reprise run` with the qemu driver (a dry run: nothing was started)".into());
    line(format!("key          {}", keyed.inputs.key()));
    for (name, value) in keyed.inputs.explain() {
        line(format!("  {name:<11}{value}"));
    }
    line(format!("revision     {}", keyed.revision.commit));
    let recipe = recipe_hash(RECIPE_FILES);
    let image = ImageCache::default_location().current();
    line(format!(
        "image        base image, recipe {} ({})",
        &recipe[..12],
        match &image {
            Some(i) => format!("built, at {}", i.dir.display()),
            None => "not built yet: the run would build it first".into(),
        }
    ));
    let choice = accel::choose(&AccelFacts::probe(), req.accel);
    line(format!("vm           accelerator {}", choice.reason));
    let snapshot = if req.fresh {
        "fresh (--fresh)".to_string()
    } else {
        // No image, no snapshot of it: the history is walked only when
        // there may be one.
        let current = image.as_ref().map(|i| {
            keyed
                .repo_id()
                .map(|repo| Snapshots::default_location().current(&repo, i))
        });
        match current {
            Some(Err(e)) => format!("unknown: {e}"),
            Some(Ok(Some(g))) => format!("generation {} of this repository", g.generation.short()),
            Some(Ok(None)) | None => "fresh (this repository has none yet)".into(),
        }
    };
    line(format!("snapshot     {snapshot}, mounted at {SNAPSHOT}"));
    let secrets: Vec<&str> = req.secrets.iter().map(|(n, _)| n.as_str()).collect();
    line(format!(
        "secrets      {}",
        if secrets.is_empty() {
            "none".to_string()
        } else {
            format!(
                "{} (passed by name in podman's environment; never counted, stored or shown)",
                secrets.join(", ")
            )
        }
    ));
    line(format!(
        "network      preparation: {}; tests: {}",
        if keyed.revision.config.network.prepare {
            "the outside network through passt (nothing of the host)"
        } else {
            "none ([network] prepare = false)"
        },
        if req.network {
            "yes (--network: the run is not hermetic)"
        } else {
            "none (loopback only)"
        }
    ));
    line("steps".into());
    let mut n = 0;
    let mut step = |what: String| {
        n += 1;
        line(format!("  {n}. {what}"));
    };
    step(format!(
        "start     a VM of the base image: /repo holds the revision's tree, {OS_MK} the workspace's mk"
    ));
    if checked.has_prepare_runtime {
        step("prepare-runtime   guest OS, as root, in /repo: mk prepare-runtime".into());
    }
    let image_name = checked
        .container_image
        .clone()
        .unwrap_or_else(|| "$CONTAINERIMAGE (written by prepare-runtime)".into());
    let mut env = keyed.inputs.env.clone();
    env.extend(req.secrets.iter().cloned());
    step(format!(
        "{:<17} in a container of {image_name}, recorded: {}",
        req.target,
        test_command(req.network, &image_name, req.target, &env).join(" ")
    ));
    let declared = &keyed.revision.config.artifacts;
    if !declared.is_empty() {
        let names: Vec<String> = declared
            .iter()
            .map(|a| format!("{CI}/artifacts/{a}"))
            .collect();
        step(format!(
            "artifacts         guest OS, after a pass: mk {} (collected from {ARTIFACTS} into {})",
            names.join(" "),
            req.artifacts_dir.display()
        ));
    }
    if checked.has_post_test {
        step("post-test         guest OS, after a pass: mk post-test".into());
    }
    line("kept".into());
    line("  the result (output and artifacts) in the local store, sealed if credentials are configured".into());
    line("  the repository's snapshot as a new generation, only if the tests pass".into());
    out
}
