//! System tests of the qemu VM driver against real VMs booted from the real
//! base image: boot, exec, files in and out, podman in the guest, isolation
//! between runs, concurrent VMs, failures that must be reported (bad kernel
//! argument, missing image, an agent that stops answering) and the CLI.

use std::time::{Duration, Instant};

use reprise_executor::saved_guests::SavedGuests;
use reprise_executor::snapshots::{Form, RepoId, STATE_DISK_BYTES, SnapshotStart, Snapshots};
use reprise_executor::vm::{
    AgentError, BootError, GuestCommand, MemoryFile, SNAPSHOT_OVERLAY, SnapshotDisk, Stream, Vm,
    VmError, saved,
};
use reprise_protocol::digest::RunKey;
use reprise_system_tests::{
    TestVm, random_tree, tree_listing, vm_config, wait_until, workspace_bin,
};

/// Runs `command` with `exec_streaming`, returning (code, stdout, stderr).
async fn streamed(vm: &Vm, command: &GuestCommand) -> (i32, Vec<u8>, Vec<u8>) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut sink = |stream: Stream, bytes: &[u8]| match stream {
        Stream::Stdout => out.extend_from_slice(bytes),
        Stream::Stderr => err.extend_from_slice(bytes),
    };
    let code = vm
        .exec_streaming(command, &mut sink)
        .await
        .expect("exec_streaming");
    (code, out, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_and_the_agent_answers() {
    let vm = TestVm::boot("boot", &vm_config()).await;
    assert!(vm.boot_time() > Duration::ZERO);
    assert!(
        vm.boot_time() < vm_config().boot_timeout,
        "{:?}",
        vm.boot_time()
    );
    let info = vm
        .agent()
        .call(qapi::qga::guest_info {})
        .await
        .expect("guest-info");
    assert!(!info.version.is_empty());
    let kernel = vm
        .sh_ok("uname -s; cat /proc/1/comm; cat /etc/hostname")
        .await;
    assert_eq!(kernel, "Linux\ncatatonit\nreprise-guest\n");
    vm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_keeps_exit_codes_and_streams_apart() {
    let vm = TestVm::boot("exec", &vm_config()).await;
    let script = "echo to-out; echo to-err >&2; printf 'more-out'; exit 7";

    let out = vm.sh(script).await;
    assert_eq!(out.code, 7);
    assert_eq!(out.stdout, b"to-out\nmore-out");
    assert_eq!(out.stderr, b"to-err\n");

    let (code, stdout, stderr) = streamed(&vm, &GuestCommand::shell(script)).await;
    assert_eq!(code, 7);
    assert_eq!(stdout, b"to-out\nmore-out");
    assert_eq!(stderr, b"to-err\n");

    // Killed by a signal: 128 + the signal.
    assert_eq!(vm.sh("kill -TERM $$").await.code, 128 + 15);
    let (code, _, _) = streamed(&vm, &GuestCommand::shell("kill -KILL $$")).await;
    assert_eq!(code, 128 + 9);

    // Success, a working directory and the environment get through.
    let cmd = GuestCommand::shell("pwd; echo \"$GREETING\"")
        .cwd("/tmp")
        .env("GREETING", "hello there");
    let out = vm.exec(&cmd).await.expect("exec");
    assert_eq!(
        (out.code, &out.stdout[..]),
        (0, &b"/tmp\nhello there\n"[..])
    );
    let (code, stdout, stderr) = streamed(&vm, &cmd).await;
    assert_eq!((code, &stdout[..]), (0, &b"/tmp\nhello there\n"[..]));
    assert!(stderr.is_empty(), "{}", String::from_utf8_lossy(&stderr));

    // Output larger than one frame arrives whole and in order.
    let (code, stdout, _) =
        streamed(&vm, &GuestCommand::shell("seq 1 200000; seq 1 1000 >&2")).await;
    assert_eq!(code, 0);
    let want: String = (1..=200_000).map(|i| format!("{i}\n")).collect();
    assert!(stdout == want.as_bytes(), "{} bytes", stdout.len());
    vm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mb_tree_goes_in_and_comes_back_identical() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let tree = scratch.path().join("tree");
    let written = random_tree(&tree, 50 << 20, 0x5eed);
    assert!(written >= 50 << 20);
    let mut config = vm_config();
    config.tree = Some(tree.clone());
    let vm = TestVm::boot("tree", &config).await;

    // The guest sees it too: the executable runs, the link resolves.
    let seen = vm
        .sh_ok("cd /repo && ./run.sh && cmp link big/blob0.bin && find . -type f | wc -l")
        .await;
    let files_on_host = tree_listing(&tree)
        .values()
        .filter(|(kind, _, _)| *kind == 'f')
        .count();
    assert_eq!(seen, format!("ran\n{files_on_host}\n"));

    let back = scratch.path().join("back");
    let started = Instant::now();
    vm.copy_out("/repo", &back).await.expect("copy_out");
    eprintln!("copy_out of {written} bytes took {:?}", started.elapsed());

    let (want, got) = (tree_listing(&tree), tree_listing(&back));
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>(),
        "the same paths"
    );
    for (path, (kind, mode, content)) in &want {
        let (got_kind, got_mode, got_content) = &got[path];
        assert_eq!((kind, mode), (got_kind, got_mode), "{}", path.display());
        assert!(content == got_content, "{} differs", path.display());
    }
    vm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_runs_a_locally_made_image() {
    let vm = TestVm::boot("podman", &vm_config()).await;
    let import = "set -e; r=$(mktemp -d); mkdir -p $r/bin $r/tmp; cp /bin/busybox $r/bin/; \
                  ln -s busybox $r/bin/sh; ln -s busybox $r/bin/cat; \
                  tar -C $r -c . | podman import -q - localhost/tiny:test >/dev/null; \
                  podman image ls --format '{{.Repository}}:{{.Tag}}'";
    let listed = vm
        .exec(&GuestCommand::shell(import).timeout(Duration::from_secs(180)))
        .await
        .expect("podman import");
    assert!(
        listed.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(String::from_utf8_lossy(&listed.stdout).contains("localhost/tiny:test"));

    let run = GuestCommand::new([
        "podman",
        "run",
        "--rm",
        "localhost/tiny:test",
        "sh",
        "-c",
        "echo hi from $(cat /proc/1/comm); echo oops >&2; exit 3",
    ])
    .timeout(Duration::from_secs(120));
    let (code, stdout, stderr) = streamed(&vm, &run).await;
    assert_eq!(
        (code, String::from_utf8_lossy(&stdout).as_ref()),
        (3, "hi from sh\n"),
        "stderr: {}",
        String::from_utf8_lossy(&stderr)
    );
    assert!(String::from_utf8_lossy(&stderr).contains("oops"));
    vm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_in_one_vm_do_not_reach_the_next_or_the_image() {
    let config = vm_config();
    let disk = config.image.disk();
    let mtime = std::fs::metadata(&disk)
        .and_then(|m| m.modified())
        .expect("mtime");

    let first = TestVm::boot("first", &config).await;
    first
        .sh_ok("echo written > /etc/marker && echo x > /root/marker && sync")
        .await;
    assert_eq!(first.sh_ok("cat /etc/marker").await, "written\n");
    first.shutdown().await;

    let second = TestVm::boot("second", &config).await;
    let out = second.sh("ls /etc/marker /root/marker").await;
    assert_ne!(out.code, 0, "{}", String::from_utf8_lossy(&out.stdout));
    second.shutdown().await;

    assert_eq!(
        std::fs::metadata(&disk)
            .and_then(|m| m.modified())
            .expect("mtime"),
        mtime
    );
    let digest = reprise_executor::image::sha256_file(&disk).expect("hash the disk");
    assert_eq!(
        digest, config.image.manifest.digest,
        "the base disk changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vms_run_at_once() {
    let config = vm_config();
    let (a, b) = tokio::join!(TestVm::boot("a", &config), TestVm::boot("b", &config));
    let (x, y) = tokio::join!(
        a.sh_ok("echo a > /root/who; sleep 1; cat /root/who"),
        b.sh_ok("echo b > /root/who; sleep 1; cat /root/who")
    );
    assert_eq!((x.as_str(), y.as_str()), ("a\n", "b\n"));
    tokio::join!(a.shutdown(), b.shutdown());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_panic_is_a_boot_error_with_the_console() {
    let mut config = vm_config();
    config.kernel_args.push("init=/nonexistent".into());
    config.boot_timeout = Duration::from_secs(60);
    let started = Instant::now();
    let err = Vm::boot(&config).await.expect_err("a guest without init");
    let message = err.to_string();
    eprintln!("boot error: {message}");
    assert!(
        matches!(err, BootError::Exited { .. }),
        "qemu should exit on the panic: {message}"
    );
    assert!(
        message.contains("Kernel panic") || message.contains("nonexistent"),
        "the console tail is in the error: {message}"
    );
    assert!(started.elapsed() < config.boot_timeout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_is_a_clear_error() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut config = vm_config();
    config.image.dir = scratch.path().join("no-such-image");
    config.boot_timeout = Duration::from_secs(20);
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(30), Vm::boot(&config))
        .await
        .expect("a missing image must not hang")
        .expect_err("there is no image");
    let chain = error_chain(&err);
    eprintln!("boot error: {chain}");
    assert!(
        chain.contains("no-such-image"),
        "the error names the missing file: {chain}"
    );
    assert!(started.elapsed() < Duration::from_secs(20), "{chain}");
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_never_answers_times_out() {
    let mut config = vm_config();
    config.agent_timeout = Duration::from_secs(3);
    let vm = TestVm::boot("paused", &config).await;
    vm.pause().await.expect("QMP stop");

    let started = Instant::now();
    let err = vm
        .exec(&GuestCommand::new(["true"]))
        .await
        .expect_err("a paused guest cannot answer");
    let waited = started.elapsed();
    eprintln!("paused guest: {err} after {waited:?}");
    assert!(
        matches!(err, VmError::Agent(AgentError::Timeout { .. })),
        "{err}"
    );
    assert!(waited < Duration::from_secs(10), "took {waited:?}");

    vm.resume().await.expect("QMP cont");
    // The timed-out connection was dropped; a new one syncs and works.
    let out = wait_until(
        "the agent to answer after resume",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async { vm.exec(&GuestCommand::shell("echo back")).await.ok() },
    )
    .await;
    assert_eq!(out.stdout, b"back\n");
    vm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_runs_a_command_and_exits_with_its_status() {
    let reprise = workspace_bin("reprise");
    let work = tempfile::tempdir().expect("tempdir");
    let out = tokio::process::Command::new(&reprise)
        .args(["vm", "exec", "--", "sh", "-c", "echo a; echo b >&2; exit 5"])
        .env("REPRISE_GUEST_BIN_DIR", reprise_system_tests::bin_dir())
        .current_dir(work.path())
        .output()
        .await
        .expect("run reprise");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "stderr: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "a\n");
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines.contains(&"b"), "{stderr}");
    assert!(
        lines.iter().any(|l| l.starts_with("reprise: accelerator ")),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_state_boots_again_with_a_new_data_disk() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut config = vm_config();
    // The machine that writes a state is the one qemu may spawn from, its
    // RAM a file in the state's folder.
    config.may_spawn = true;
    let state_dir = scratch.path().join("state");
    std::fs::create_dir_all(&state_dir).expect("state folder");
    let ram = saved::ram_file(&state_dir);
    config.memory_file = Some(MemoryFile {
        path: ram.clone(),
        shared: true,
    });
    let source = TestVm::boot("source", &config).await;
    source
        .sh_ok("echo before-save > /root/saved && echo x > /reprise/old-disk")
        .await;
    let saved = source
        .save_state(&state_dir, &config)
        .await
        .expect("save the guest state");
    eprintln!("saved {} bytes of state", saved.state_bytes());
    source.shutdown().await;
    // The RAM is the file, not in the state: that holds the devices only.
    let state_len = std::fs::metadata(state_dir.join("state.bin"))
        .expect("state file")
        .len();
    assert!(state_len < 16 << 20, "the state holds {state_len} bytes");
    let ram_before = reprise_executor::image::sha256_file(&ram).expect("hash the RAM file");

    let tree = scratch.path().join("tree");
    random_tree(&tree, 3 << 20, 7);
    let mut restore = vm_config();
    restore.tree = Some(tree.clone());
    restore.restore = Some(saved.clone());
    let vm = TestVm::boot("restored", &restore).await;
    // The saved guest's files are there, the new data disk replaced the old.
    assert_eq!(vm.sh_ok("cat /root/saved").await, "before-save\n");
    assert_ne!(vm.sh("test -e /reprise/old-disk").await.code, 0);
    let listing = vm
        .sh_ok("cd /repo && ./run.sh && cmp link big/blob0.bin && echo same")
        .await;
    assert_eq!(listing, "ran\nsame\n");
    // The clock was set from the host's.
    let guest_now: u64 = vm.sh_ok("date +%s").await.trim().parse().expect("a time");
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert!(
        guest_now.abs_diff(host_now) < 5,
        "guest {guest_now} host {host_now}"
    );
    let (code, stdout, _) = streamed(&vm, &GuestCommand::shell("echo streamed")).await;
    assert_eq!((code, &stdout[..]), (0, &b"streamed\n"[..]));
    let back = scratch.path().join("back");
    vm.copy_out("/repo", &back).await.expect("copy_out");
    assert!(
        tree_listing(&tree) == tree_listing(&back),
        "the tree came back changed"
    );

    // A second restore from the same state is as fresh as the first.
    let again = TestVm::boot("again", &restore).await;
    assert_eq!(again.sh("ls /root/after").await.code, 2);
    vm.sh_ok("touch /root/after").await;
    assert_eq!(again.sh("ls /root/after").await.code, 2);
    // What each writes to its RAM (a tmpfs is RAM only) is its own, and
    // the saved RAM file stays as it was saved.
    vm.sh_ok("head -c 16777216 /dev/urandom > /dev/shm/noise && echo mine > /dev/shm/who")
        .await;
    again.sh_ok("echo again > /dev/shm/who").await;
    assert_eq!(vm.sh_ok("cat /dev/shm/who").await, "mine\n");
    assert_eq!(again.sh("test -e /dev/shm/noise").await.code, 1);
    tokio::join!(vm.shutdown(), again.shutdown());
    assert!(
        reprise_executor::image::sha256_file(&ram).expect("hash the RAM file") == ram_before,
        "a restored guest wrote to the saved RAM file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_state_disk_is_plugged_into_restored_guests() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let states = SavedGuests::new(scratch.path().join("states"));
    let snapshots = Snapshots::new(scratch.path().join("snapshots"), Form::Disk);
    let mut config = vm_config();
    let mut steps = Vec::new();
    let saved = states
        .ensure(&config, &mut |s| steps.push(s.to_string()))
        .await
        .expect("make the saved guest");
    assert_eq!(steps.len(), 1, "made once: {steps:?}");
    assert!(saved.has_snapshot_slot());
    let again = states
        .ensure(&config, &mut |s| panic!("made twice: {s}"))
        .await
        .expect("the saved guest again");
    assert_eq!(again.dir(), saved.dir());

    // First run: a blank snapshot disk, written by the guest.
    let blank = snapshots.blank().expect("blank snapshot disk");
    config.restore = Some(saved.clone());
    config.snapshot_disk = Some(SnapshotDisk::On(blank.clone()));
    let first = TestVm::boot("first", &config).await;
    first
        .sh_ok(
            "mkdir -p /mnt/s && mount /dev/vdc /mnt/s && test -d /mnt/s/lost+found && \
             echo kept > /mnt/s/note && sync && fsfreeze -f /mnt/s && fsfreeze -u /mnt/s",
        )
        .await;
    let kept = scratch.path().join("kept");
    first.into_vm().stop_keeping(&kept).await.expect("stop");
    let image = config.image.clone();
    let repo = RepoId {
        namespace: "ns".into(),
        anchor: "root".into(),
    };
    snapshots
        .update(
            &repo,
            &image,
            &kept.join(SNAPSHOT_OVERLAY),
            SnapshotStart::Fresh(blank),
            &RunKey::from_bytes([1; 32]),
        )
        .expect("fold the run into the generation");
    let generation = snapshots
        .current(&repo, &image)
        .expect("the new generation");

    // Second run: restored from the same state, on the generation.
    config.snapshot_disk = Some(SnapshotDisk::On(generation.path.clone()));
    let second = TestVm::boot("second", &config).await;
    assert_eq!(
        second
            .sh_ok("mkdir -p /mnt/s && mount /dev/vdc /mnt/s && cat /mnt/s/note")
            .await,
        "kept\n"
    );
    // The guest sees the whole disk, not the placeholder the state was
    // saved with.
    let sectors: u64 = second
        .sh_ok("cat /sys/block/vdc/size")
        .await
        .trim()
        .parse()
        .expect("a size");
    assert_eq!(sectors * 512, STATE_DISK_BYTES);
    second.shutdown().await;

    // A state that does not load is an error, not a hang; discarded, it is
    // made anew.
    let file = saved.dir().join("state.bin");
    let len = std::fs::metadata(&file).expect("state file").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .and_then(|f| f.set_len(len / 2))
        .expect("truncate the state");
    let started = Instant::now();
    let err = Vm::boot(&config).await.expect_err("a truncated state");
    assert!(
        started.elapsed() < config.boot_timeout,
        "took {:?}",
        started.elapsed()
    );
    eprintln!("truncated state: {}", error_chain(&err));
    states.discard(&saved);
    let mut plain = config.clone();
    plain.restore = None;
    assert!(states.get(&plain).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interactive_shell_runs_on_a_real_terminal() {
    use reprise_executor::vm::shell::{TermSize, interactive_shell};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut config = vm_config();
    config.tty = true;
    let vm = TestVm::boot("shell", &config).await;
    let (mut user, host_in) = tokio::io::duplex(4096);
    let (host_out, mut screen) = tokio::io::duplex(1 << 16);
    let typing = async move {
        user.write_all(b"tty; stty size; case $- in *m*) echo job-control;; esac; pwd\n")
            .await
            .expect("type");
        user.write_all(b"echo fin$((1+1)); exit 3\n")
            .await
            .expect("type");
        user
    };
    let reading = async move {
        let mut all = Vec::new();
        screen.read_to_end(&mut all).await.expect("read the screen");
        all
    };
    let size = Some(TermSize {
        rows: 33,
        cols: 101,
    });
    let shell = interactive_shell(&vm, host_in, host_out, size, "dumb");
    let (code, _user, screen) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(shell, typing, reading)
    })
    .await
    .expect("the shell exits");
    let screen = String::from_utf8_lossy(&screen).replace('\r', "");
    eprintln!("{screen}");
    assert_eq!(code.expect("the shell ran"), 3, "{screen}");
    let lines: Vec<&str> = screen.lines().collect();
    for want in ["/dev/ttyS1", "33 101", "job-control", "/repo", "fin2"] {
        assert!(lines.contains(&want), "{want:?} missing from:\n{screen}");
    }
    vm.shutdown().await;
}

/// Regression: a command that timed out was left running (captured exec
/// killed only the shell, streaming exec tried process groups the guest
/// helper never makes), and so were its children.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_commands_left_their_processes_running() {
    let vm = TestVm::boot("timeout", &vm_config()).await;
    let limit = Duration::from_secs(2);
    let slow = GuestCommand::shell("sleep 301 & sleep 302; echo never").timeout(limit);
    let started = Instant::now();
    let err = vm.exec(&slow).await.expect_err("captured exec times out");
    assert!(matches!(err, VmError::TimedOut(_)), "{err}");
    let mut sink = |_: Stream, _: &[u8]| {};
    let err = vm
        .exec_streaming(&slow, &mut sink)
        .await
        .expect_err("streaming exec times out");
    assert!(matches!(err, VmError::TimedOut(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
    wait_until(
        "the timed-out commands to be gone",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || async {
            let out = vm
                .sh_ok(
                    "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done \
                     | grep -c '^sleep 30[12]' || true",
                )
                .await;
            (out.trim() == "0").then_some(())
        },
    )
    .await;
    vm.shutdown().await;
}

/// Regression: the guest agent shared a session with the commands it runs,
/// so a stopped job whose process group became orphaned (the kernel then
/// sends SIGHUP to the whole group) killed the agent, and with it PID 1: a
/// kernel panic. The timeout kill, which stops a tree before killing it,
/// hit this now and then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphaned_stopped_job_does_not_take_the_agent_down() {
    let vm = TestVm::boot("orphan", &vm_config()).await;
    // `(sleep 0.3 &)` leaves a process whose parent is init; when it exits
    // while `sleep 30` is stopped, its process group counts as orphaned.
    let script = "sleep 30 & s=$!; kill -STOP $s; (sleep 0.3 &); sleep 1.5; \
                  kill -KILL $s; echo survived";
    let out = vm.sh(script).await;
    assert_eq!(
        (out.code, String::from_utf8_lossy(&out.stdout).trim()),
        (0, "survived"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, stdout, _) = streamed(&vm, &GuestCommand::shell(script)).await;
    assert_eq!(
        (code, String::from_utf8_lossy(&stdout).trim()),
        (0, "survived")
    );
    assert_eq!(vm.sh_ok("echo still here").await, "still here\n");
    vm.shutdown().await;
}
