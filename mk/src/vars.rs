//! The variable table: values as word lists plus the flags mk keeps per name.

use std::collections::HashMap;

/// Names mk sets for each recipe; they are never imported from the
/// environment and are always expanded when a recipe is printed.
pub const INTERNAL: [&str; 18] = [
    "target",
    "stem",
    "prereq",
    "pid",
    "nproc",
    "newprereq",
    "alltarget",
    "newmember",
    "stem0",
    "stem1",
    "stem2",
    "stem3",
    "stem4",
    "stem5",
    "stem6",
    "stem7",
    "stem8",
    "stem9",
];

/// Whether `name` is one of the per-recipe variables in [`INTERNAL`].
pub fn is_internal(name: &str) -> bool {
    INTERNAL.contains(&name)
}

/// One variable: its words and the flags attached to its name.
#[derive(Debug, Clone, Default)]
pub struct Var {
    /// The value, a list of words.
    pub value: Vec<String>,
    /// Set by a mkfile or command-line assignment (so recipes print it expanded).
    pub weset: bool,
    /// Carries the `U` attribute: not exported to recipes.
    pub noexport: bool,
    /// Set on the command line: later mkfile assignments are ignored.
    pub overridden: bool,
}

/// The variable table.
#[derive(Debug, Clone, Default)]
pub struct Vars {
    map: HashMap<String, Var>,
}

impl Vars {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Imports an environment: each variable becomes a one-word value,
    /// except the internal names, which are skipped.
    pub fn import_env<I, K, V>(&mut self, env: I)
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        for (k, v) in env {
            let k = k.into();
            if is_internal(&k) {
                continue;
            }
            self.set(&k, vec![v.into()]);
        }
    }

    /// The variable named `name`, if set.
    pub fn get(&self, name: &str) -> Option<&Var> {
        self.map.get(name)
    }

    /// Mutable access, creating an unset entry (no value) if needed.
    pub fn entry(&mut self, name: &str) -> &mut Var {
        self.map.entry(name.to_string()).or_default()
    }

    /// Sets the value of `name`, keeping its flags.
    pub fn set(&mut self, name: &str, value: Vec<String>) {
        self.entry(name).value = value;
    }

    /// The words of `name`, or nothing.
    pub fn words(&self, name: &str) -> &[String] {
        self.map
            .get(name)
            .map(|v| v.value.as_slice())
            .unwrap_or(&[])
    }

    /// The exported variables as `(name, words)` pairs: everything but the
    /// `U` ones and the internal names.
    pub fn exported(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.map
            .iter()
            .filter(|(k, v)| !v.noexport && !is_internal(k))
            .map(|(k, v)| (k.as_str(), v.value.as_slice()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_skips_internal_names_and_keeps_one_word() {
        let mut v = Vars::new();
        v.import_env([("target", "x"), ("CFLAGS", "-O2 -g")]);
        assert!(v.get("target").is_none());
        assert_eq!(v.words("CFLAGS"), ["-O2 -g"]);
    }

    #[test]
    fn exported_omits_noexport() {
        let mut v = Vars::new();
        v.set("A", vec!["1".into()]);
        v.set("B", vec!["2".into()]);
        v.entry("B").noexport = true;
        let names: Vec<_> = v.exported().map(|(k, _)| k).collect();
        assert_eq!(names, ["A"]);
    }
}
