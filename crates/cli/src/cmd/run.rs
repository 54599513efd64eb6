//! `ferry run`, `ferry restore`, `ferry workloads`: one VM in the foreground.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_vmm::snapshot::SNAPSHOT_FILE;
use ferry_vmm::{AttachedFiles, HostOptions, Microvm, VmConfig, VmExit};

use crate::{RestoreArgs, RunArgs, EXIT_VM_FAILED};

/// The ELF for `workload`: a built-in name or a path.
pub fn resolve_image(workload: &str) -> anyhow::Result<Cow<'static, [u8]>> {
    Ok(ferry_guest_images::resolve(workload)?)
}

/// Console on stdout, and the accelerator thread count asked for (else all cores).
fn host_options(accel_threads: Option<u16>) -> HostOptions {
    let mut host = HostOptions::stdout();
    if let Some(threads) = accel_threads {
        host.accel_threads = usize::from(threads);
    }
    host
}

/// Turns how the guest ended into ferry's exit code.
pub fn exit_code(exit: VmExit) -> ExitCode {
    match exit {
        VmExit::Exited(code) => ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX)),
        VmExit::Failed(e) => {
            eprintln!("ferry: the VM failed: {e}");
            ExitCode::from(EXIT_VM_FAILED)
        }
    }
}

fn wait_to_end(mut vm: Microvm) -> anyhow::Result<ExitCode> {
    let exit = vm.wait(None).context("the VM is not running")?;
    Ok(exit_code(exit))
}

/// `ferry run`.
pub fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    // Before the VM runs: a folder found unusable only at the snapshot point would end a
    // VM that ran for nothing.
    if let (Some(_), Some(dir)) = (args.snapshot_at_ms, &args.snapshot_dir) {
        snapshot_dir(dir)?;
    }
    let image = resolve_image(&args.workload)?;
    let config = VmConfig::new(args.memory).with_accel(args.accel_memory.unwrap_or(0));
    let mut host = host_options(args.accel_threads);
    host.backend = args.backend.resolve()?;
    host.files = AttachedFiles::open(&args.attach).context("cannot attach the files")?;
    let mut vm = Microvm::boot(config, &image, &args.guest_args, host)
        .with_context(|| format!("cannot start a VM for {}", args.workload))?;
    vm.resume()?;
    let (Some(at_ms), Some(dir)) = (args.snapshot_at_ms, &args.snapshot_dir) else {
        return wait_to_end(vm);
    };
    if let Some(exit) = vm.wait(Some(Duration::from_millis(at_ms))) {
        bail!("the guest {exit} before the snapshot point ({at_ms} ms); no snapshot was written");
    }
    vm.pause().context("cannot pause the VM for the snapshot")?;
    let path = dir.join(SNAPSHOT_FILE);
    let started = Instant::now();
    // The folder again (it was checked before the VM ran, and may have gone since).
    let saved = snapshot_dir(dir).and_then(|()| vm.save(&path).map_err(anyhow::Error::new));
    let stats = match saved {
        Ok(stats) => stats,
        Err(e) => {
            // Nothing is lost: the VM runs on to its end, and the run fails after it.
            eprintln!(
                "ferry: cannot save the snapshot to {}: {e:#}; the VM continues without it",
                path.display(),
            );
            vm.resume()
                .context("cannot resume the VM after the failed snapshot")?;
            wait_to_end(vm)?;
            bail!("the snapshot was not written (see above); the guest ran to its end");
        }
    };
    // Device chunks that hold pieces of attached files (a model's weights) are named by
    // the piece, not copied: restoring reads them from the files again.
    let named = match stats.file_chunks {
        0 => String::new(),
        n => format!(", {n} device chunks named in attached files"),
    };
    eprintln!(
        "ferry: VM paused at {:.1} ms of guest time and saved to {} ({} MiB RAM, {:.1} MiB stored{named}, {} ms); continue it with: ferry restore {}",
        vm.guest_time_ns() as f64 / 1e6,
        path.display(),
        stats.ram_bytes >> 20,
        stats.file_bytes as f64 / f64::from(1 << 20),
        started.elapsed().as_millis(),
        std::path::absolute(dir).as_deref().unwrap_or(dir).display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Makes the snapshot folder `dir` (readable by its owner only, as the snapshot holds the
/// guest's memory), or takes an existing one if it is ours: in a folder another user
/// owns, they could swap the snapshot as it is written.
fn snapshot_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let meta =
        std::fs::symlink_metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    // SAFETY: geteuid takes no arguments and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != me {
        bail!(
            "{} is not a folder of this user's (uid {me}): choose another --snapshot-dir",
            dir.display()
        );
    }
    // Others who may write the folder may rename the snapshot's temporary too: this save
    // would rename theirs into place, report it saved and end the VM. The sticky bit
    // keeps them off this user's files; a group-writable folder of the user's own group
    // (a user private group) is theirs alone.
    // SAFETY: getegid takes no arguments and cannot fail.
    let group = unsafe { libc::getegid() };
    let mode = meta.mode();
    let shared = mode & 0o002 != 0 || (mode & 0o020 != 0 && meta.gid() != group);
    if shared && mode & 0o1000 == 0 {
        bail!(
            "{} may be written by other users (mode {:o}): choose another --snapshot-dir, or take their write access away (chmod go-w)",
            dir.display(),
            mode & 0o7777
        );
    }
    Ok(())
}

/// The snapshot file named by a `ferry restore` argument: a directory or the file itself.
fn snapshot_path(arg: &Path) -> PathBuf {
    if arg.is_dir() {
        arg.join(SNAPSHOT_FILE)
    } else {
        arg.to_owned()
    }
}

/// `ferry restore`.
pub fn restore(args: &RestoreArgs) -> anyhow::Result<ExitCode> {
    let path = snapshot_path(&args.dir);
    if args.dir.is_dir() && !path.exists() {
        anyhow::bail!(
            "{} is not a snapshot folder: it has no {} (ferry run --snapshot-at-ms MS --snapshot-dir DIR writes one)",
            args.dir.display(),
            ferry_vmm::snapshot::SNAPSHOT_FILE
        );
    }
    let started = Instant::now();
    let mut host = host_options(args.accel_threads);
    host.files = AttachedFiles::open(&args.attach).context("cannot attach the files")?;
    let (mut vm, stats) = Microvm::restore(&path, host).context("cannot restore the VM")?;
    let named = match stats.file_chunks {
        0 => String::new(),
        n => format!(", {n} device chunks read from attached files"),
    };
    eprintln!(
        "ferry: VM restored from {} ({} MiB RAM, {:.1} MiB read{named}, {} ms); it continues at {:.1} ms of guest time",
        path.display(),
        stats.ram_bytes >> 20,
        stats.file_bytes as f64 / f64::from(1 << 20),
        started.elapsed().as_millis(),
        vm.guest_time_ns() as f64 / 1e6,
    );
    vm.resume()?;
    wait_to_end(vm)
}

/// `ferry workloads`.
pub fn list_workloads() -> anyhow::Result<ExitCode> {
    let all = ferry_guest_images::all();
    let width = all.iter().map(|i| i.name.len()).max().unwrap_or(0);
    for image in all {
        let kind = if image.test_only { " (test guest)" } else { "" };
        super::print_line(format_args!(
            "{:<width$} {}{kind}",
            image.name, image.summary
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_snapshot_folder_others_may_write_is_refused() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().join("snap");
        let chmod = |mode| {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        snapshot_dir(&dir).unwrap();
        // The user's own group may write it; anyone may, if the sticky bit keeps them off
        // this user's files.
        for mode in [0o700, 0o770, 0o1777] {
            chmod(mode);
            snapshot_dir(&dir).unwrap_or_else(|e| panic!("{mode:o}: {e:#}"));
        }
        chmod(0o777);
        let err = format!("{:#}", snapshot_dir(&dir).unwrap_err());
        assert!(err.contains("other users (mode 777)"), "{err}");
        // A group of others' may write it.
        // SAFETY: getegid takes no arguments and cannot fail.
        let other = unsafe { libc::getegid() } + 1;
        if std::os::unix::fs::chown(&dir, None, Some(other)).is_ok() {
            chmod(0o770);
            let err = format!("{:#}", snapshot_dir(&dir).unwrap_err());
            assert!(err.contains("other users (mode 770)"), "{err}");
        }
    }
}
