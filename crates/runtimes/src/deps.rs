//! Dependencies, per language: which files of a directory source declare them, the package
//! manager command that builds them (inside a build sandbox, see the `refinery-deps` crate),
//! which part of the build is the layer, and where the layer is mounted in the block's
//! instances so the runtime finds it (BRIEF §7c).
//!
//! | language | declared by | built with | layer | mounted at |
//! |---|---|---|---|---|
//! | python | `requirements.txt` | `python3 -m pip install --target` | the target dir | `/deps`, on `sys.path` after the block's own dirs (the shim) |
//! | node | `package.json` (+ `package-lock.json`) | `npm ci` with a lockfile, else `npm install`, `--omit=dev` | `node_modules` | `/node_modules`, where resolution from `/code` looks last |

use refinery_domain::{BlockSpec, Language};

/// Inside a build sandbox: the block's directory, copied (writable: in-tree builds of local
/// packages write there).
pub const BUILD_SRC: &str = "/build/src";
/// Inside a build sandbox: where pip installs (Python's layer).
pub const BUILD_OUT: &str = "/build/out";
/// Where the scratch dir of a build is mounted (writable).
pub const BUILD_DIR: &str = "/build";

/// How one language's dependencies are declared, built and mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DepsDescriptor {
    pub language: Language,
    /// The file of the block's directory that declares them.
    pub manifest: &'static str,
    /// A lockfile read with it when present (part of the layer's key).
    pub lockfile: Option<&'static str>,
    /// Where the layer is mounted read-only in the block's instances.
    pub mount_at: &'static str,
    /// Where it is hard-linked instead, relative to `/code`, when an instance adopts a
    /// standby sandbox (started before the layer was known): a path the runtime finds the
    /// same way.
    pub standby_at: &'static str,
    /// The layer: this directory of the build's scratch dir (relative to [`BUILD_DIR`]).
    pub layer_in_build: &'static str,
    /// Variables of the server's environment passed to a build (prefixes; the package
    /// manager's own configuration: index URL, certificates, timeouts).
    pub config_env_prefixes: &'static [&'static str],
    /// Host configuration files bound read-only at the same path in a build sandbox, when
    /// present.
    pub config_files: &'static [&'static str],
}

pub const PYTHON: DepsDescriptor = DepsDescriptor {
    language: Language::Python,
    manifest: "requirements.txt",
    lockfile: None,
    mount_at: "/deps",
    standby_at: ".deps",
    layer_in_build: "out",
    config_env_prefixes: &["PIP_"],
    config_files: &["/etc/pip.conf", "/etc/xdg/pip/pip.conf"],
};

pub const NODE: DepsDescriptor = DepsDescriptor {
    language: Language::Node,
    manifest: "package.json",
    lockfile: Some("package-lock.json"),
    mount_at: "/node_modules",
    standby_at: "node_modules",
    layer_in_build: "src/node_modules",
    config_env_prefixes: &["NPM_CONFIG_", "npm_config_"],
    config_files: &["/etc/npmrc"],
};

/// Variables every build gets from the server's environment when set: where TLS trust comes
/// from (a host whose traffic goes through an intercepting proxy names its CA here).
pub const BUILD_TRUST_ENV: &[&str] = &[
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
];

/// The dependency descriptor of `language`, if it has dependencies at all.
pub fn descriptor(language: Language) -> Option<&'static DepsDescriptor> {
    match language {
        Language::Python => Some(&PYTHON),
        Language::Node => Some(&NODE),
        Language::Shell => None,
    }
}

/// What a block declares: its dependency files (name, contents), and whether they name
/// packages inside the block's own directory (then the whole directory is the build's input).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    pub descriptor: &'static DepsDescriptor,
    pub files: Vec<(String, String)>,
    pub local: bool,
}

/// The block's declared dependencies, None if it declares none (no file, or one that names
/// no package). `Err`: a `package.json` that is not JSON (the message says where).
pub fn declared(block: &BlockSpec) -> Result<Option<Declared>, String> {
    let Some(descriptor) = descriptor(block.language) else {
        return Ok(None);
    };
    let Some(manifest) = block.files.get(descriptor.manifest) else {
        return Ok(None);
    };
    let (any, local) = match block.language {
        Language::Python => {
            let lines = manifest
                .lines()
                .map(|l| l.split(" #").next().unwrap_or("").trim())
                .filter(|l| !l.is_empty() && !l.starts_with('#'));
            let mut any = false;
            let mut local = false;
            for line in lines {
                any = true;
                let target = line.strip_prefix("-e").unwrap_or(line).trim_start();
                local |= target.starts_with('.')
                    || target.starts_with('/')
                    || target.starts_with("file:")
                    || target.starts_with("-r")
                    || target.starts_with("-c");
            }
            (any, local)
        }
        _ => {
            let json: serde_json::Value = serde_json::from_str(manifest).map_err(|e| {
                format!(
                    "block `{}`: its package.json is not valid JSON ({e}); fix it or remove it",
                    block.name
                )
            })?;
            let deps: Vec<&str> = ["dependencies", "optionalDependencies"]
                .iter()
                .filter_map(|k| json.get(*k)?.as_object())
                .flat_map(|o| o.values().filter_map(|v| v.as_str()))
                .collect();
            let scripts = json
                .get("scripts")
                .and_then(|s| s.as_object())
                .is_some_and(|s| {
                    ["preinstall", "install", "postinstall", "prepare"]
                        .iter()
                        .any(|k| s.contains_key(*k))
                });
            let local = deps
                .iter()
                .any(|v| v.starts_with("file:") || v.starts_with('.') || v.starts_with('/'));
            (!deps.is_empty() || scripts, local || scripts)
        }
    };
    if !any {
        return Ok(None);
    }
    let mut files = vec![(descriptor.manifest.to_string(), manifest.clone())];
    if let Some(lock) = descriptor.lockfile {
        if let Some(contents) = block.files.get(lock) {
            files.push((lock.to_string(), contents.clone()));
        }
    }
    Ok(Some(Declared {
        descriptor,
        files,
        local,
    }))
}

/// The command a build sandbox runs (paths inside it): the package manager in the block's
/// copied directory, its output in the scratch dir, no cache kept, no prompt.
pub fn build_argv(declared: &Declared) -> Vec<String> {
    let script = match declared.descriptor.language {
        Language::Python => format!(
            "cd {BUILD_SRC} && exec /usr/bin/python3 -m pip install --no-cache-dir --no-input \
             --disable-pip-version-check --progress-bar off --target {BUILD_OUT} -r requirements.txt"
        ),
        _ => {
            let has_lock = declared.files.iter().any(|(n, _)| n == "package-lock.json");
            let command = if has_lock { "ci" } else { "install --no-package-lock" };
            format!(
                "cd {BUILD_SRC} && exec /usr/bin/npm {command} --omit=dev --no-audit --no-fund \
                 --no-update-notifier --loglevel=http"
            )
        }
    };
    vec!["/bin/sh".into(), "-c".into(), script]
}

/// The host command whose output names the runtime version (part of the layer's key: a
/// layer built for another interpreter is another layer).
pub fn version_argv(language: Language) -> Option<Vec<&'static str>> {
    match language {
        Language::Python => Some(vec![
            "/usr/bin/python3",
            "-c",
            "import sys; print(sys.version)",
        ]),
        Language::Node => Some(vec!["/usr/bin/node", "--version"]),
        Language::Shell => None,
    }
}

/// Where the layer `hash` of `account` lives under the layer root (`<root>/<account>/<hash>`):
/// per account, so one account's build can never be another's layer. None if either part
/// is not a plain path component (an account id is `[A-Za-z0-9_-]`, a key 64 hex digits).
pub fn layer_path(root: &std::path::Path, account: &str, hash: &str) -> Option<std::path::PathBuf> {
    let account_ok = !account.is_empty()
        && account
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let hash_ok = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
    (account_ok && hash_ok).then(|| root.join(account).join(hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(language: Language, files: &[(&str, &str)]) -> BlockSpec {
        BlockSpec {
            name: "b".into(),
            language,
            source_name: "main.py".into(),
            code: String::new(),
            files: files
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            function: "main".into(),
            memory_mb: 128,
            timeout_s: 10,
            max_concurrency: 1,
            keep_alive_s: None,
            min_warm: 0,
            tmp_mb: 64,
            env: Default::default(),
            secret_env: Default::default(),
            network: false,
            deps_layer: None,
            binary_files: Default::default(),
            shared: Vec::new(),
        }
    }

    #[test]
    fn python_requirements_are_detected_and_local_paths_flagged() {
        let b = block(Language::Python, &[("requirements.txt", "# none\n\n")]);
        assert_eq!(declared(&b).expect("valid"), None);
        let b = block(Language::Python, &[("requirements.txt", "six==1.16.0\n")]);
        let d = declared(&b).expect("valid").expect("declared");
        assert!(!d.local);
        assert_eq!(d.files.len(), 1);
        let b = block(Language::Python, &[("requirements.txt", "./evil\n")]);
        assert!(declared(&b).expect("valid").expect("declared").local);
    }

    #[test]
    fn node_package_json_needs_dependencies_or_install_scripts() {
        let b = block(Language::Node, &[("package.json", r#"{"type":"module"}"#)]);
        assert_eq!(declared(&b).expect("valid"), None);
        let b = block(
            Language::Node,
            &[
                ("package.json", r#"{"dependencies":{"ms":"2.1.3"}}"#),
                ("package-lock.json", "{}"),
            ],
        );
        let d = declared(&b).expect("valid").expect("declared");
        assert_eq!(d.files.len(), 2);
        assert!(build_argv(&d)[2].contains("npm ci"));
        let b = block(Language::Node, &[("package.json", "{nope")]);
        assert!(declared(&b)
            .expect_err("invalid")
            .contains("not valid JSON"));
    }
}
