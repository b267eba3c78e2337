//! Registered modules: the `NAME.tool.json` manifests of `bulwark mcp --tools DIR`.
//!
//! A manifest is `{"name": NAME, "description": TEXT, "input_schema": {"type": "object", ...}}`
//! and sits beside its module, `NAME.wasm` or `NAME.wat`. Everything is checked when the server
//! starts, and a bad manifest stops it with a message naming the file: a tool that is listed
//! can be called.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::compile::read_regular_file;

/// The file-name suffix of a manifest.
pub const SUFFIX: &str = ".tool.json";

/// Largest manifest file, in bytes.
pub const MAX_MANIFEST_BYTES: u64 = 256 << 10;

/// Most registered tools, over all `--tools` directories.
pub const MAX_TOOLS: usize = 256;

/// Most directory entries looked at in one `--tools` directory.
pub const MAX_DIR_ENTRIES: usize = 16_384;

/// Longest tool name, in bytes.
pub const MAX_NAME: usize = 64;

/// Longest description, in bytes.
pub const MAX_DESCRIPTION: usize = 4096;

/// Names of the built-in tools, which no manifest may take.
pub const RESERVED: [&str; 2] = ["run_python", "run_javascript"];

/// One registered module.
#[derive(Clone, Debug, PartialEq)]
pub struct Registered {
    /// The tool's name (the manifest's and the module's `NAME`).
    pub name: String,
    /// What the tool does, for the agent.
    pub description: String,
    /// The JSON Schema of the tool's arguments (an object schema).
    pub input_schema: Map<String, Value>,
    /// The module file, `NAME.wasm` or `NAME.wat`.
    pub module: PathBuf,
    /// The manifest it came from.
    pub manifest: PathBuf,
}

/// Why the registered tools cannot be loaded; each message names the file or directory.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A `--tools` directory cannot be listed.
    #[error("--tools {}: cannot list it: {source}", dir.display())]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A `--tools` directory holds more entries than are looked at.
    #[error("--tools {}: more than {MAX_DIR_ENTRIES} entries; keep only tools there", dir.display())]
    TooManyEntries {
        /// The directory.
        dir: PathBuf,
    },
    /// More manifests than [`MAX_TOOLS`].
    #[error("more than {MAX_TOOLS} registered tools (at {}): register fewer", file.display())]
    TooManyTools {
        /// The manifest past the limit.
        file: PathBuf,
    },
    /// One manifest is unreadable or wrong.
    #[error("{}: {message}", file.display())]
    Bad {
        /// The manifest.
        file: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
}

/// The manifest file's content, exactly these fields.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    name: String,
    description: String,
    input_schema: Value,
}

/// Loads every `NAME.tool.json` of `dirs` (in name order per directory), checked.
pub fn load(dirs: &[PathBuf]) -> Result<Vec<Registered>, ManifestError> {
    let mut tools: Vec<Registered> = Vec::new();
    let mut by_name: BTreeMap<String, PathBuf> = BTreeMap::new();
    for dir in dirs {
        for file in manifests_in(dir)? {
            if tools.len() >= MAX_TOOLS {
                return Err(ManifestError::TooManyTools { file });
            }
            let tool = load_one(&file)?;
            if let Some(first) = by_name.get(&tool.name) {
                return Err(ManifestError::Bad {
                    message: format!(
                        "the tool name {:?} is registered already by {}: tool names must be unique",
                        tool.name,
                        first.display()
                    ),
                    file,
                });
            }
            by_name.insert(tool.name.clone(), file);
            tools.push(tool);
        }
    }
    Ok(tools)
}

/// The manifest files directly in `dir`, sorted.
fn manifests_in(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let dir_error = |source| ManifestError::Dir {
        dir: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for (i, entry) in std::fs::read_dir(dir).map_err(dir_error)?.enumerate() {
        if i >= MAX_DIR_ENTRIES {
            return Err(ManifestError::TooManyEntries {
                dir: dir.to_path_buf(),
            });
        }
        let entry = entry.map_err(dir_error)?;
        let name = entry.file_name();
        // A non-UTF-8 NAME is listed too, so that `load_one` refuses it by name.
        if name.to_string_lossy().ends_with(SUFFIX) {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Reads and checks one manifest.
fn load_one(file: &Path) -> Result<Registered, ManifestError> {
    let bad = |message: String| ManifestError::Bad {
        file: file.to_path_buf(),
        message,
    };
    let stem = file
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(SUFFIX))
        .ok_or_else(|| {
            bad(format!(
                "a manifest's file name must be NAME{SUFFIX}, NAME in [a-zA-Z0-9_-]"
            ))
        })?;
    check_name(stem).map_err(|e| bad(format!("the file name's NAME: {e}")))?;
    let bytes = read_regular_file(file, MAX_MANIFEST_BYTES)
        .map_err(|e| bad(format!("cannot read it: {e}")))?;
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
        bad(format!(
            "not a tool manifest ({e}); it must be a JSON object with exactly \"name\", \"description\" and \"input_schema\""
        ))
    })?;
    check_name(&manifest.name).map_err(|e| bad(format!("\"name\": {e}")))?;
    if manifest.name != stem {
        return Err(bad(format!(
            "\"name\" is {:?} but the file is {stem}{SUFFIX}: they must be the same",
            manifest.name
        )));
    }
    if RESERVED.contains(&manifest.name.as_str()) {
        return Err(bad(format!(
            "\"name\": {:?} is a built-in tool's name; choose another",
            manifest.name
        )));
    }
    let description = manifest.description.trim();
    if description.is_empty() || manifest.description.len() > MAX_DESCRIPTION {
        return Err(bad(format!(
            "\"description\" must say what the tool does, in 1 to {MAX_DESCRIPTION} bytes"
        )));
    }
    let input_schema = check_schema(manifest.input_schema).map_err(bad)?;
    let module = module_beside(file, stem).map_err(bad)?;
    Ok(Registered {
        name: manifest.name,
        description: description.to_owned(),
        input_schema,
        module,
        manifest: file.to_path_buf(),
    })
}

/// Checks a tool name: 1 to [`MAX_NAME`] characters of `[a-zA-Z0-9_-]`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!("{name:?} must be 1 to {MAX_NAME} characters long"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "{name:?} has {c:?}; a tool name may hold only a-z, A-Z, 0-9, _ and -"
        ));
    }
    Ok(())
}

/// Checks that `schema` is a JSON Schema object for an object (`"type": "object"`).
fn check_schema(schema: Value) -> Result<Map<String, Value>, String> {
    let Value::Object(map) = schema else {
        return Err("\"input_schema\" must be a JSON Schema object".into());
    };
    if map.get("type") != Some(&Value::String("object".into())) {
        return Err(
            "\"input_schema\" must have \"type\": \"object\" (a tool's arguments are a JSON object)"
                .into(),
        );
    }
    if let Some(props) = map.get("properties")
        && !props.is_object()
    {
        return Err("\"input_schema\".\"properties\" must be an object".into());
    }
    Ok(map)
}

/// The module beside `manifest`: `NAME.wasm` or `NAME.wat`, exactly one of them, a regular file.
fn module_beside(manifest: &Path, name: &str) -> Result<PathBuf, String> {
    let dir = manifest.parent().unwrap_or(Path::new("."));
    let found: Vec<PathBuf> = ["wasm", "wat"]
        .iter()
        .map(|ext| dir.join(format!("{name}.{ext}")))
        .filter(|p| std::fs::symlink_metadata(p).is_ok())
        .collect();
    match found.as_slice() {
        [] => Err(format!(
            "no module beside it: put {name}.wasm or {name}.wat in {}",
            dir.display()
        )),
        [one] => match std::fs::metadata(one) {
            Ok(meta) if meta.is_file() => Ok(one.clone()),
            Ok(_) => Err(format!("{} is not a regular file", one.display())),
            Err(e) => Err(format!("{}: {e}", one.display())),
        },
        _ => Err(format!(
            "both {name}.wasm and {name}.wat are beside it: keep one"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory for one test.
    fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "bulwark-mcp-manifest-{}-{test}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    const GOOD: &str = r#"{"name": "echo", "description": "Echoes its input.",
        "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}}}"#;

    #[test]
    fn a_good_manifest_registers_its_module() {
        let dir = scratch("good");
        write(&dir, "echo.tool.json", GOOD);
        let module = write(&dir, "echo.wat", "(module)");
        write(&dir, "other.wasm", "not registered");
        let tools = load(std::slice::from_ref(&dir)).unwrap();
        assert_eq!(tools.len(), 1);
        assert_eq!(tools[0].name, "echo");
        assert_eq!(tools[0].description, "Echoes its input.");
        assert_eq!(tools[0].module, module);
        assert_eq!(tools[0].input_schema["type"], "object");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Loads a directory with one manifest `file` holding `text` (and NAME.wat for its NAME),
    /// and returns the error message.
    fn refused(test: &str, file: &str, text: &str) -> String {
        let dir = scratch(test);
        let path = write(&dir, file, text);
        if let Some(stem) = file.strip_suffix(SUFFIX) {
            write(&dir, &format!("{stem}.wat"), "(module)");
        }
        let e = load(std::slice::from_ref(&dir)).unwrap_err().to_string();
        assert!(
            e.contains(&path.display().to_string()),
            "the message does not name {}: {e}",
            path.display()
        );
        let _ = std::fs::remove_dir_all(&dir);
        e
    }

    #[test]
    fn bad_manifests_are_refused_naming_the_file() {
        let e = refused("json", "echo.tool.json", "{not json");
        assert!(e.contains("not a tool manifest"), "{e}");
        let e = refused(
            "extra",
            "echo.tool.json",
            r#"{"name":"echo","description":"d","input_schema":{"type":"object"},"x":1}"#,
        );
        assert!(e.contains("unknown field"), "{e}");
        let e = refused(
            "missing",
            "echo.tool.json",
            r#"{"name":"echo","input_schema":{"type":"object"}}"#,
        );
        assert!(e.contains("description"), "{e}");
        let e = refused(
            "charset",
            "echo.tool.json",
            r#"{"name":"ec ho","description":"d","input_schema":{"type":"object"}}"#,
        );
        assert!(e.contains("may hold only"), "{e}");
        let e = refused(
            "mismatch",
            "echo.tool.json",
            r#"{"name":"other","description":"d","input_schema":{"type":"object"}}"#,
        );
        assert!(e.contains("must be the same"), "{e}");
        let e = refused(
            "reserved",
            "run_python.tool.json",
            r#"{"name":"run_python","description":"d","input_schema":{"type":"object"}}"#,
        );
        assert!(e.contains("built-in"), "{e}");
        let e = refused(
            "type",
            "echo.tool.json",
            r#"{"name":"echo","description":"d","input_schema":{"type":"string"}}"#,
        );
        assert!(e.contains("\"type\": \"object\""), "{e}");
        let e = refused(
            "schema",
            "echo.tool.json",
            r#"{"name":"echo","description":"d","input_schema":[]}"#,
        );
        assert!(e.contains("JSON Schema object"), "{e}");
        let e = refused(
            "empty-description",
            "echo.tool.json",
            r#"{"name":"echo","description":"  ","input_schema":{"type":"object"}}"#,
        );
        assert!(e.contains("\"description\""), "{e}");
        let long = "x".repeat(MAX_NAME + 1);
        let e = refused(
            "long",
            &format!("{long}.tool.json"),
            &format!(r#"{{"name":"{long}","description":"d","input_schema":{{"type":"object"}}}}"#),
        );
        assert!(e.contains("1 to 64"), "{e}");
        let big = format!(
            r#"{{"name":"echo","description":"{}","input_schema":{{"type":"object"}}}}"#,
            "x".repeat(usize::try_from(MAX_MANIFEST_BYTES).unwrap())
        );
        let e = refused("big", "echo.tool.json", &big);
        assert!(e.contains("limit"), "{e}");
    }

    #[test]
    fn the_module_must_be_there_and_unambiguous() {
        let dir = scratch("nomodule");
        let file = write(&dir, "echo.tool.json", GOOD);
        let e = load(std::slice::from_ref(&dir)).unwrap_err().to_string();
        assert!(
            e.contains(&file.display().to_string()) && e.contains("echo.wasm or echo.wat"),
            "{e}"
        );
        write(&dir, "echo.wat", "(module)");
        write(&dir, "echo.wasm", "");
        let e = load(std::slice::from_ref(&dir)).unwrap_err().to_string();
        assert!(e.contains("keep one"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_name_registered_twice_is_refused() {
        let a = scratch("dup-a");
        let b = scratch("dup-b");
        for dir in [&a, &b] {
            write(dir, "echo.tool.json", GOOD);
            write(dir, "echo.wat", "(module)");
        }
        let e = load(&[a.clone(), b.clone()]).unwrap_err().to_string();
        assert!(
            e.contains(&b.join("echo.tool.json").display().to_string())
                && e.contains(&a.join("echo.tool.json").display().to_string())
                && e.contains("unique"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&a);
        let _ = std::fs::remove_dir_all(&b);
    }

    #[test]
    fn a_missing_directory_is_named() {
        let dir = std::env::temp_dir().join("bulwark-mcp-no-such-dir-for-sure");
        let e = load(std::slice::from_ref(&dir)).unwrap_err().to_string();
        assert!(e.contains(&dir.display().to_string()), "{e}");
    }
}
