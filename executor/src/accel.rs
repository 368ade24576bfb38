//! Choosing the accelerator: KVM when it works, TCG otherwise, and why.
//!
//! The decision is a pure function of facts read from the host
//! ([`AccelFacts::probe`]), so it is tested without touching `/dev/kvm`.
//! Opening `/dev/kvm` is not enough: under some hypervisors it is `kvm_pvm`,
//! which opens but on which qemu aborts (`failed to set MSR 0x10a`) or runs
//! about a hundred times slower than TCG. Real KVM needs the CPU's
//! virtualisation extensions (vmx or svm) visible to this kernel.

use std::fmt;
use std::str::FromStr;

/// A qemu accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// The name qemu and users use.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(format!("unknown accelerator '{other}' (use kvm or tcg)")),
        }
    }
}

/// What the host tells about KVM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelFacts {
    /// `Ok` if `/dev/kvm` opened for reading and writing, else why not.
    pub kvm_device: Result<(), String>,
    /// Whether the CPU flags show vmx or svm.
    pub cpu_virt: bool,
    /// Whether the `kvm_pvm` module (a paravirtual KVM) is what backs `/dev/kvm`.
    pub kvm_pvm: bool,
}

impl AccelFacts {
    /// Reads the facts from this host. Never blocks for long: it opens a
    /// device and reads two files.
    pub fn probe() -> AccelFacts {
        let kvm_device = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(drop)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => "no /dev/kvm".to_string(),
                std::io::ErrorKind::PermissionDenied => {
                    "/dev/kvm: permission denied (add yourself to the kvm group)".to_string()
                }
                _ => format!("/dev/kvm: {e}"),
            });
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        AccelFacts {
            kvm_device,
            cpu_virt: cpu_has_virt(&cpuinfo),
            kvm_pvm: std::path::Path::new("/sys/module/kvm_pvm").exists(),
        }
    }
}

fn cpu_has_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|f| f == "vmx" || f == "svm")
}

/// The accelerator chosen and the one line that says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

/// Picks the accelerator from the facts, or takes the one the user forced.
pub fn choose(facts: &AccelFacts, forced: Option<Accel>) -> AccelChoice {
    if let Some(accel) = forced {
        return AccelChoice {
            accel,
            reason: format!("{accel} (forced by --accel)"),
        };
    }
    let tcg = |why: String| AccelChoice {
        accel: Accel::Tcg,
        reason: format!("tcg: {why}; software emulation, expect runs several times slower"),
    };
    match &facts.kvm_device {
        Err(why) => tcg(why.clone()),
        Ok(()) if facts.kvm_pvm => tcg(
            "/dev/kvm is kvm_pvm (nested paravirtual KVM), on which qemu aborts or crawls".into(),
        ),
        Ok(()) if !facts.cpu_virt => {
            tcg("/dev/kvm opens but the CPU shows no vmx/svm, so KVM would not be real".into())
        }
        Ok(()) => AccelChoice {
            accel: Accel::Kvm,
            reason: "kvm: /dev/kvm is usable and the CPU has hardware virtualisation".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(kvm: Result<(), &str>, cpu_virt: bool, kvm_pvm: bool) -> AccelFacts {
        AccelFacts {
            kvm_device: kvm.map_err(str::to_string),
            cpu_virt,
            kvm_pvm,
        }
    }

    #[test]
    fn choice_follows_the_facts() {
        let cases = [
            (facts(Ok(()), true, false), None, Accel::Kvm, "usable"),
            (facts(Ok(()), false, true), None, Accel::Tcg, "kvm_pvm"),
            (facts(Ok(()), true, true), None, Accel::Tcg, "kvm_pvm"),
            (facts(Ok(()), false, false), None, Accel::Tcg, "no vmx/svm"),
            (
                facts(Err("no /dev/kvm"), true, false),
                None,
                Accel::Tcg,
                "no /dev/kvm",
            ),
            (
                facts(Err("no /dev/kvm"), false, false),
                Some(Accel::Kvm),
                Accel::Kvm,
                "forced",
            ),
            (
                facts(Ok(()), true, false),
                Some(Accel::Tcg),
                Accel::Tcg,
                "forced",
            ),
        ];
        for (facts, forced, want, because) in cases {
            let choice = choose(&facts, forced);
            assert_eq!(choice.accel, want, "{facts:?} {forced:?}");
            assert!(choice.reason.contains(because), "{}", choice.reason);
            assert!(!choice.reason.contains('\n'));
        }
    }

    #[test]
    fn cpu_flags_are_read_from_cpuinfo() {
        assert!(cpu_has_virt("processor : 0\nflags\t\t: fpu vme vmx sse\n"));
        assert!(cpu_has_virt("flags : svm lm\n"));
        assert!(!cpu_has_virt(
            "flags : fpu vme sse\nmodel name : vmx-like\n"
        ));
    }

    #[test]
    fn accel_names_parse() {
        assert_eq!("kvm".parse(), Ok(Accel::Kvm));
        assert_eq!("tcg".parse(), Ok(Accel::Tcg));
        assert!("hvf".parse::<Accel>().is_err());
    }
}
