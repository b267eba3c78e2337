//! `bulwark doctor`: checks what running tools in micro-VMs needs on this host, and says what to
//! fix. It never makes KVM calls itself: it boots a real, confined VM through `bulwark-vmm`
//! and lists each protection layer the VMM put on (or why the host did not allow one).

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use crate::{cache, compile::sha256_hex, vm};

/// One check's result.
struct Check {
    name: String,
    level: Level,
    detail: String,
}

/// How a check came out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Ok,
    /// Works, with less protection than it could have (a confinement layer the host lacks).
    Warn,
    Fail,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        }
    }
}

fn check(name: &str, result: Result<String, String>) -> Check {
    let (level, detail) = match result {
        Ok(detail) => (Level::Ok, detail),
        Err(detail) => (Level::Fail, detail),
    };
    Check {
        name: name.to_owned(),
        level,
        detail,
    }
}

/// One check per protection layer the VMM reported with `--report-confinement` (a line like
/// `no_new_privs on; user namespace unavailable (why); ...`): on is ok, anything else a warning
/// that says why.
fn layer_checks(report: &str) -> Vec<Check> {
    const LAYERS: [&str; 8] = [
        "no_new_privs",
        "dumpable",
        "rlimits",
        "user namespace",
        "landlock",
        "seccomp",
        "smep",
        "smap",
    ];
    report
        .split("; ")
        .filter_map(|item| {
            let layer = LAYERS.iter().find(|l| item.starts_with(*l))?;
            let state = item[layer.len()..].trim();
            let good = state.starts_with("on") || (*layer == "dumpable" && state == "off");
            Some(Check {
                name: format!("vmm {layer}"),
                level: if good { Level::Ok } else { Level::Warn },
                detail: state.to_owned(),
            })
        })
        .collect()
}

fn kvm_device() -> Result<String, String> {
    let path = Path::new("/dev/kvm");
    if !path.exists() {
        return Err("/dev/kvm does not exist: load kvm_intel or kvm_amd, or use a VM with nested virtualization".into());
    }
    let c_path = c"/dev/kvm";
    // SAFETY: access(2) only reads the NUL-terminated path it is given.
    let ok = unsafe { libc::access(c_path.as_ptr(), libc::R_OK | libc::W_OK) } == 0;
    if !ok {
        return Err(
            "/dev/kvm is not readable and writable by you: run as root or join the kvm group"
                .into(),
        );
    }
    Ok("/dev/kvm is readable and writable".into())
}

fn kvm_flavour() -> Result<String, String> {
    let loaded: Vec<&str> = ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .into_iter()
        .filter(|m| Path::new("/sys/module").join(m).exists())
        .collect();
    match loaded.as_slice() {
        [] => Err("no KVM module (kvm_intel, kvm_amd, kvm_pvm) is loaded".into()),
        ["kvm_pvm"] => Ok("kvm_pvm (software nested virtualization: guest CPL0 code is emulated; Bulwark's guest runs at CPL3 and is not affected, but each VM exit costs tens of microseconds)".into()),
        mods => Ok(format!("{} (hardware virtualization)", mods.join(", "))),
    }
}

/// Largest VMM or guest image doctor reads to print its digest.
const MAX_CHECKED_FILE: u64 = 256 << 20;

fn file_check(env: &str, name: &str) -> Result<String, String> {
    let path = vm::locate(env, name).map_err(|e| format!("{e:#}"))?;
    // Opened once and capped: a FIFO or a device named by the environment cannot hang doctor.
    let bytes = crate::compile::read_regular_file(&path, MAX_CHECKED_FILE)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(format!(
        "{} ({} bytes, sha256 {})",
        path.display(),
        bytes.len(),
        &sha256_hex(&bytes)[..16]
    ))
}

fn cache_check() -> Result<String, String> {
    let dir = cache::dir().join("artifacts");
    // Private, like the compile cache makes it.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| {
            format!(
                "cannot create the compile cache {}: {e}; set BULWARK_CACHE_DIR",
                dir.display()
            )
        })?;
    let probe = dir.join(format!(".doctor-{}", std::process::id()));
    std::fs::write(&probe, b"ok")
        .map_err(|e| format!("the compile cache {} is not writable: {e}", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    let (count, bytes) = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .fold((0, 0u64), |(n, b), m| (n + 1, b + m.len()))
        })
        .unwrap_or((0, 0));
    Ok(format!(
        "{} ({count} artifacts, {} KiB; engine key {})",
        dir.display(),
        bytes / 1024,
        cache::engine_key(crate::cli::Target::Guest)
    ))
}

/// Boots a confined VM; on success returns what to say and the VMM's confinement report.
fn boot_check() -> Result<(String, String), String> {
    let vmm = vm::locate("BULWARK_VMM", "bulwark-vmm").map_err(|e| format!("{e:#}"))?;
    let guest = vm::locate("BULWARK_GUEST", "bulwark-guest.elf").map_err(|e| format!("{e:#}"))?;
    let started = Instant::now();
    let out = Command::new(&vmm)
        .args(["--timeout", "10", "--report-confinement"])
        .arg(&guest)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot start {}: {e}", vmm.display()))?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let report = err
            .lines()
            .find_map(|l| l.strip_prefix("bulwark-vmm: confinement: "))
            .unwrap_or("")
            .to_owned();
        Ok((
            format!("a confined VM booted the guest and exited cleanly in {ms:.1} ms"),
            report,
        ))
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!(
            "booting a VM failed ({}): {}",
            out.status,
            err.trim()
        ))
    }
}

/// Runs `bulwark doctor`.
pub fn run(json: bool) -> ExitCode {
    let mut checks = vec![
        check("kvm device", kvm_device()),
        check("kvm", kvm_flavour()),
        check("vmm", file_check("BULWARK_VMM", "bulwark-vmm")),
        check(
            "guest image",
            file_check("BULWARK_GUEST", "bulwark-guest.elf"),
        ),
        check("compile cache", cache_check()),
    ];
    match boot_check() {
        Ok((detail, report)) => {
            checks.push(check("boot", Ok(detail)));
            checks.extend(layer_checks(&report));
        }
        Err(e) => checks.push(check("boot", Err(e))),
    }
    let all_ok = checks.iter().all(|c| c.level != Level::Fail);
    if json {
        let items: Vec<_> = checks
            .iter()
            .map(|c| {
                serde_json::json!({
                    "check": c.name,
                    "ok": c.level != Level::Fail,
                    "level": c.level.name(),
                    "detail": c.detail,
                })
            })
            .collect();
        println!("{}", serde_json::json!({"ok": all_ok, "checks": items}));
    } else {
        for c in &checks {
            println!("{:<4} {:<19} {}", c.level.name(), c.name, c.detail);
        }
        if checks.iter().any(|c| c.level == Level::Warn) {
            println!(
                "\nwarn: the VM runs, with a protection layer this host does not offer (the reason is on its line)."
            );
        }
        if !all_ok {
            println!(
                "\nFix the FAIL lines above; `make guest` builds the VMM and the guest image."
            );
        }
    }
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
