//! `vm_bench`: figures for the qemu VM driver on this host: cold boot to a
//! guest agent that answers, the agent's exec round trip, `podman run` in
//! the guest, a 50 MB tree in (data disk) and out (`copy_out`), and booting
//! from a saved guest beside a cold boot.
//!
//! Usage: `vm_bench [RUNS]` (default 5; the exec round trip always takes 20
//! samples). Run `cargo build --workspace` first: the guest helper and mk
//! are found beside this binary. Prints figures; asserts nothing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reprise_executor::accel::{self, AccelFacts};
use reprise_executor::image::ImageCache;
use reprise_executor::vm::{GuestCommand, Vm, VmConfig, disk};

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// One row of the table: a name and its samples.
struct Row {
    name: String,
    samples: Vec<Duration>,
}

impl Row {
    fn print(&self) {
        let mut s = self.samples.clone();
        s.sort();
        if s.is_empty() {
            println!("{:<44} {:>4}  (no samples)", self.name, 0);
            return;
        }
        println!(
            "{:<44} {:>4} {:>9.3} {:>9.3} {:>9.3}",
            self.name,
            s.len(),
            median(&s).as_secs_f64(),
            s[0].as_secs_f64(),
            s[s.len() - 1].as_secs_f64()
        );
    }
}

fn median(sorted: &[Duration]) -> Duration {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2
    }
}

fn sorted(mut v: Vec<Duration>) -> Vec<Duration> {
    v.sort();
    v
}

fn main() -> BenchResult<()> {
    let runs: usize = match std::env::args().nth(1) {
        Some(n) => n
            .parse()
            .unwrap_or_else(|_| reprise_bench::usage_exit(&n, "usage: vm_bench [RUNS]")),
        None => 5,
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(runs.max(1)))
}

async fn bench(runs: usize) -> BenchResult<()> {
    let image = ImageCache::default_location()
        .ensure(&mut |phase| eprintln!("image: {phase}"))
        .map_err(|e| format!("the base image: {e}"))?;
    let choice = accel::choose(&AccelFacts::probe(), None);
    println!("accelerator: {}", choice.reason);
    println!(
        "accelerators measured: {} only (the one accel::choose considers usable on this host)",
        choice.accel
    );
    let mut config = VmConfig::new(image, choice.accel);
    if !config
        .guest_bins
        .iter()
        .any(|p| p.ends_with("reprise-guest"))
    {
        return Err(
            "reprise-guest not found beside vm_bench: run `cargo build --workspace`".into(),
        );
    }
    let scratch = tempfile::tempdir()?;
    config.work_root = scratch.path().join("vms");
    println!(
        "{} vCPU, {} MiB per VM; {runs} runs each\n",
        config.cpus, config.memory_mib
    );

    let mut rows = Vec::new();
    let mut failures = Vec::new();

    // Cold boots.
    let mut cold = Vec::new();
    for i in 0..runs {
        match Vm::boot(&config).await {
            Ok(vm) => {
                cold.push(vm.boot_time());
                eprintln!("cold boot {i}: {:?}", vm.boot_time());
                vm.shutdown().await;
            }
            Err(e) => failures.push(format!("cold boot: {e}")),
        }
    }
    let cold = sorted(cold);
    rows.push(Row {
        name: format!("cold boot to agent ready ({})", config.accel),
        samples: cold.clone(),
    });

    // Exec round trip and podman, in one VM.
    match exec_and_podman(&config, runs).await {
        Ok(mut r) => rows.append(&mut r),
        Err(e) => failures.push(format!("exec/podman: {e}")),
    }

    // A 50 MB tree in and out.
    let tree = scratch.path().join("tree");
    let bytes = write_tree(&tree, 50 << 20)?;
    println!("tree: {} MB in {} files", bytes >> 20, count_files(&tree));
    match tree_in_out(&config, &tree, scratch.path(), runs).await {
        Ok(mut r) => rows.append(&mut r),
        Err(e) => failures.push(format!("tree in/out: {e}")),
    }

    // Boot from a saved guest.
    let mut ratio = None;
    match saved_state(&config, scratch.path(), runs).await {
        Ok((mut r, restore)) => {
            if !cold.is_empty() && !restore.is_empty() {
                ratio = Some(median(&cold).as_secs_f64() / median(&restore).as_secs_f64());
            }
            rows.append(&mut r);
        }
        Err(e) => failures.push(format!("saved guest: {e}")),
    }

    println!(
        "\n{:<44} {:>4} {:>9} {:>9} {:>9}",
        "seconds", "runs", "median", "min", "max"
    );
    for row in &rows {
        row.print();
    }
    if let Some(r) = ratio {
        println!("\ncold boot / restore from saved guest: {r:.1}x");
    }
    for f in &failures {
        println!("FAILED: {f}");
    }
    Ok(())
}

async fn exec_and_podman(config: &VmConfig, runs: usize) -> BenchResult<Vec<Row>> {
    let vm = Vm::boot(config).await?;
    let mut exec = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let out = vm.exec(&GuestCommand::new(["true"])).await?;
        exec.push(t.elapsed());
        if !out.success() {
            return Err("`true` failed in the guest".into());
        }
    }
    let mut rows = vec![Row {
        name: "exec round trip (`true`, captured)".into(),
        samples: exec,
    }];

    let import = "set -e; r=$(mktemp -d); mkdir -p $r/bin $r/tmp; cp /bin/busybox $r/bin/; \
                  ln -s busybox $r/bin/sh; ln -s busybox $r/bin/true; \
                  tar -C $r -c . | podman import -q - localhost/tiny:bench >/dev/null";
    let t = Instant::now();
    let out = vm
        .exec(&GuestCommand::shell(import).timeout(Duration::from_secs(300)))
        .await?;
    if !out.success() {
        return Err(format!(
            "podman import: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    rows.push(Row {
        name: "podman import of a busybox image (once)".into(),
        samples: vec![t.elapsed()],
    });
    let mut podman = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let out = vm
            .exec(
                &GuestCommand::new(["podman", "run", "--rm", "localhost/tiny:bench", "true"])
                    .timeout(Duration::from_secs(120)),
            )
            .await?;
        podman.push(t.elapsed());
        if !out.success() {
            return Err(format!(
                "podman run: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into());
        }
    }
    rows.push(Row {
        name: "podman run --rm IMAGE true (in the guest)".into(),
        samples: podman,
    });
    vm.shutdown().await;
    Ok(rows)
}

async fn tree_in_out(
    config: &VmConfig,
    tree: &Path,
    scratch: &Path,
    runs: usize,
) -> BenchResult<Vec<Row>> {
    // The data disk alone, as Vm::boot makes it: a hard-linked staging copy
    // and mkfs.ext4 -d.
    let mut mkfs = Vec::new();
    for i in 0..runs {
        let dir = scratch.join(format!("disk{i}"));
        let staging = dir.join("data");
        std::fs::create_dir_all(&staging)?;
        let t = Instant::now();
        let status = std::process::Command::new("cp")
            .args(["-al", "--no-target-directory"])
            .arg(tree)
            .arg(staging.join("repo"))
            .status()?;
        if !status.success() {
            return Err("cp -al of the tree failed".into());
        }
        disk::make_data_disk(&staging, &dir.join("data.raw"), config.data_spare_bytes)?;
        mkfs.push(t.elapsed());
        std::fs::remove_dir_all(&dir)?;
    }

    let mut with_tree = config.clone();
    with_tree.tree = Some(tree.to_path_buf());
    let (mut boots, mut outs) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let vm = Vm::boot(&with_tree).await?;
        boots.push(vm.boot_time());
        let back = scratch.join(format!("back{i}"));
        let t = Instant::now();
        vm.copy_out("/repo", &back).await?;
        outs.push(t.elapsed());
        vm.shutdown().await;
        std::fs::remove_dir_all(&back)?;
    }
    Ok(vec![
        Row {
            name: "50 MB tree: staging + mkfs.ext4 -d".into(),
            samples: mkfs,
        },
        Row {
            name: "50 MB tree: cold boot with it mounted".into(),
            samples: boots,
        },
        Row {
            name: "50 MB tree: copy_out(\"/repo\")".into(),
            samples: outs,
        },
    ])
}

async fn saved_state(
    config: &VmConfig,
    scratch: &Path,
    runs: usize,
) -> BenchResult<(Vec<Row>, Vec<Duration>)> {
    let mut source_config = config.clone();
    source_config.may_spawn = true;
    let source = Vm::boot(&source_config).await?;
    let t = Instant::now();
    let saved = source
        .save_state(&scratch.join("saved"), &source_config)
        .await?;
    let save_time = t.elapsed();
    source.shutdown().await;
    println!(
        "saved guest: {} MB machine state, {} KB root disk overlay",
        saved.state_bytes() >> 20,
        std::fs::metadata(saved.disk())?.len() >> 10
    );
    let mut restore_config = config.clone();
    restore_config.restore = Some(saved);
    let mut restores = Vec::new();
    let mut first_exec = Vec::new();
    for _ in 0..runs {
        let vm = Vm::boot(&restore_config).await?;
        restores.push(vm.boot_time());
        let t = Instant::now();
        let out = vm.exec(&GuestCommand::shell("ls /reprise/bin")).await?;
        first_exec.push(t.elapsed());
        if !String::from_utf8_lossy(&out.stdout).contains("reprise-guest") {
            return Err("the restored guest does not see its new data disk".into());
        }
        vm.shutdown().await;
    }
    let restores = sorted(restores);
    Ok((
        vec![
            Row {
                name: "save the booted guest's state (once)".into(),
                samples: vec![save_time],
            },
            Row {
                name: "restore saved guest to ready (data mounted)".into(),
                samples: restores.clone(),
            },
            Row {
                name: "first exec after restore".into(),
                samples: first_exec,
            },
        ],
        restores,
    ))
}

/// About `total` bytes of pseudo-random data in three large files and many
/// small ones in nested folders.
fn write_tree(root: &Path, total: usize) -> BenchResult<usize> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut bytes = |n: usize| {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            v.extend_from_slice(&state.to_le_bytes());
        }
        v.truncate(n);
        v
    };
    let mut written = 0;
    let mut put = |path: PathBuf, n: usize| -> BenchResult<()> {
        std::fs::create_dir_all(path.parent().ok_or("no parent")?)?;
        std::fs::write(path, bytes(n))?;
        Ok(())
    };
    for (i, share) in [5usize, 4, 3].iter().enumerate() {
        let n = total * share / 25;
        put(root.join(format!("big/blob{i}.bin")), n)?;
        written += n;
    }
    let mut i = 0;
    while written < total {
        let n = (1 + (i * 7919) % (96 << 10)).min(total - written);
        put(root.join(format!("src/d{}/e{}/f{i}.dat", i % 8, i % 5)), n)?;
        written += n;
        i += 1;
    }
    Ok(written)
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() { count_files(&p) } else { 1 }
                })
                .sum()
        })
        .unwrap_or(0)
}
