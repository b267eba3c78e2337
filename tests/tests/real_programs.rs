//! Real command-line programs from crates.io (ripgrep, jaq, comrak: pinned in
//! `images/real-programs.txt`, built for wasm32-wasip1 by `images/real-programs.sh`) run over the
//! sample tree in `tests/fixtures/real-programs`, once with `bulwark run` in a micro-VM and once
//! with `--isolation wasm` (wasmtime-wasi, the reference). Each isolation gets its own fresh copy
//! of the tree and the same arguments, environment and standard input; standard output, standard
//! error, the exit code and the tree afterwards (every file's bytes, every directory) must be
//! byte-identical.
//!
//! Each case also states the exit code the reference gives, so that a case in which both sides
//! fail the same way (a wrong path, say) cannot pass unnoticed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Output;

use bulwark_tests::*;

/// The line `bulwark run --isolation wasm` always starts its stderr with.
const WASM_WARNING: &str = "bulwark: warning: --isolation wasm: hardware isolation is OFF; \
     the tool runs in this process with only the Wasm sandbox around it\n";

/// One entry of a tree.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    Dir,
    File(Vec<u8>),
    /// Anything else (a link, a FIFO): its file type, for the message.
    Other(String),
}

/// A whole tree: path relative to its root -> entry.
type Tree = BTreeMap<String, Entry>;

/// Reads every entry under `root`, without following links.
fn snapshot(root: &Path) -> Tree {
    fn walk(root: &Path, dir: &Path, out: &mut Tree) {
        let entries =
            std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        for entry in entries {
            let path = entry
                .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
                .path();
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .display()
                .to_string();
            let meta = std::fs::symlink_metadata(&path)
                .unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()));
            if meta.is_dir() {
                out.insert(rel, Entry::Dir);
                walk(root, &path, out);
            } else if meta.is_file() {
                let bytes = std::fs::read(&path)
                    .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
                out.insert(rel, Entry::File(bytes));
            } else {
                out.insert(rel, Entry::Other(format!("{:?}", meta.file_type())));
            }
        }
    }
    let mut out = Tree::new();
    walk(root, root, &mut out);
    out
}

/// Copies the tree `from` into `to` (which must not exist), files and directories only.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("cannot create {}: {e}", to.display()));
    for (rel, entry) in snapshot(from) {
        let dest = to.join(&rel);
        match entry {
            Entry::Dir => std::fs::create_dir_all(&dest),
            Entry::File(bytes) => std::fs::write(&dest, bytes),
            Entry::Other(kind) => panic!("the fixture holds {rel}, a {kind}"),
        }
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", dest.display()));
    }
}

/// The sample tree: the committed fixture plus what git cannot hold (an empty directory) or
/// should not (a binary file).
fn sample_tree(dest: &Path) {
    copy_tree(&repo_root().join("tests/fixtures/real-programs"), dest);
    std::fs::create_dir_all(dest.join("empty"))
        .unwrap_or_else(|e| panic!("cannot create empty/: {e}"));
    std::fs::write(
        dest.join("data/blob.bin"),
        b"\x7fBIN\x00\x01\x02TODO: inside a binary file\n\xff\xfe",
    )
    .unwrap_or_else(|e| panic!("cannot write data/blob.bin: {e}"));
    // Larger than the programs' read buffers (ripgrep reads 64 KiB at a time), so reads that
    // end mid-line and short reads matter.
    let mut log = String::new();
    for i in 0..6000u32 {
        let level = if i % 997 == 0 { "ERROR" } else { "info" };
        let _ = writeln!(
            log,
            "{i:05} {level} request {} took {} ms",
            i * 7919 % 10007,
            i % 311
        );
    }
    std::fs::write(dest.join("data/big.log"), log)
        .unwrap_or_else(|e| panic!("cannot write data/big.log: {e}"));
    let mut json = String::from("[");
    for i in 0..3000u32 {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(
            json,
            "{sep}\n  {{\"id\": {i}, \"name\": \"user-{i}\", \"score\": {}.{}, \"even\": {}}}",
            i * 31 % 1000,
            i % 10,
            i % 2 == 0
        );
    }
    json.push_str("\n]\n");
    std::fs::write(dest.join("data/big.json"), json)
        .unwrap_or_else(|e| panic!("cannot write data/big.json: {e}"));
}

/// One invocation of a program.
struct Case<'a> {
    /// A name for the scratch directories.
    name: &'a str,
    /// The program, as `build/real/<program>.wasm`.
    program: &'a str,
    /// Where the tool sees the sample tree (`.` makes relative paths work).
    guest_dir: &'a str,
    /// `NAME=VALUE` environment variables.
    env: &'a [&'a str],
    /// The tool's arguments.
    args: &'a [&'a str],
    /// Standard input.
    stdin: &'a [u8],
    /// The exit code the reference (`--isolation wasm`) gives.
    exit: i32,
    /// Files the call must create or change in the tree (checked on the reference; the VM's tree
    /// must then equal it).
    writes: &'a [&'a str],
}

impl Default for Case<'_> {
    fn default() -> Self {
        Case {
            name: "",
            program: "",
            guest_dir: ".",
            env: &[],
            args: &[],
            stdin: b"",
            exit: 0,
            writes: &[],
        }
    }
}

/// What one isolation gave.
#[derive(Debug)]
struct Answer {
    exit: Option<i32>,
    stdout: Vec<u8>,
    /// The tool's stderr and bulwark's own messages, without the `--isolation wasm` warning.
    stderr: Vec<u8>,
    tree: Tree,
    /// The scratch directory the tree was in.
    scratch: PathBuf,
}

/// Runs `case` with `isolation` over a fresh copy of the sample tree.
fn run_case(case: &Case, isolation: &str) -> Answer {
    let scratch = scratch_dir(&format!("real-{}-{isolation}", case.name));
    let dir = scratch.join("tree");
    sample_tree(&dir);
    let module = built(&format!("real/{}.wasm", case.program));
    let module = module.display().to_string();
    let dir_spec = format!("{}::{}", dir.display(), case.guest_dir);
    // Compiling a module of a few MiB takes seconds (more on a loaded machine): the timeout
    // bounds the compile as well as the call.
    let mut args = vec![
        "--isolation",
        isolation,
        "--timeout",
        "300s",
        "--dir",
        &dir_spec,
    ];
    for env in case.env {
        args.extend(["--env", env]);
    }
    args.push(&module);
    args.push("--");
    args.extend_from_slice(case.args);
    let out: Output = bulwark_run(&args, case.stdin);
    let mut stderr = out.stderr;
    if isolation == "wasm" {
        assert!(
            stderr.starts_with(WASM_WARNING.as_bytes()),
            "--isolation wasm did not warn first: {}",
            String::from_utf8_lossy(&stderr)
        );
        stderr.drain(..WASM_WARNING.len());
    }
    Answer {
        exit: out.status.code(),
        stdout: out.stdout,
        stderr,
        tree: snapshot(&dir),
        scratch,
    }
}

/// A line diff of two texts (`-` only in `vm`, `+` only in `wasm`), with both in full when they
/// are short.
fn diff_text(vm: &[u8], wasm: &[u8]) -> String {
    let (a, b) = (String::from_utf8_lossy(vm), String::from_utf8_lossy(wasm));
    let a: Vec<&str> = a.split_inclusive('\n').collect();
    let b: Vec<&str> = b.split_inclusive('\n').collect();
    // Longest common subsequence table, from the ends.
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut out = String::from("--- vm\n+++ wasm (the reference)\n");
    let (mut i, mut j) = (0, 0);
    let line = |sign: char, text: &str| format!("{sign} {:?}\n", text);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push_str(&line(' ', a[i]));
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push_str(&line('+', b[j]));
            j += 1;
        } else {
            out.push_str(&line('-', a[i]));
            i += 1;
        }
    }
    out
}

/// An entry in a few words, for messages.
fn describe(entry: Option<&Entry>) -> String {
    match entry {
        None => "has nothing there".to_owned(),
        Some(Entry::Dir) => "has a directory".to_owned(),
        Some(Entry::File(bytes)) => format!("has a file of {} bytes", bytes.len()),
        Some(Entry::Other(kind)) => format!("has a {kind}"),
    }
}

/// Where two trees differ, one line (or diff) per path; empty when they are the same.
fn diff_trees(vm: &Tree, wasm: &Tree) -> String {
    let mut out = String::new();
    let paths: std::collections::BTreeSet<&String> = vm.keys().chain(wasm.keys()).collect();
    for path in paths {
        match (vm.get(path), wasm.get(path)) {
            (Some(a), Some(b)) if a == b => {}
            (Some(Entry::File(a)), Some(Entry::File(b))) => {
                let _ = write!(out, "{path}: contents differ\n{}", diff_text(a, b));
            }
            (a, b) => {
                let _ = writeln!(out, "{path}: vm {}, wasm {}", describe(a), describe(b));
            }
        }
    }
    out
}

/// Every way `vm` differs from `wasm`, as a report; empty when they are byte-identical.
fn differences(vm: &Answer, wasm: &Answer) -> String {
    let mut out = String::new();
    if vm.exit != wasm.exit {
        let _ = writeln!(out, "exit code: vm {:?}, wasm {:?}", vm.exit, wasm.exit);
    }
    if vm.stdout != wasm.stdout {
        let _ = write!(
            out,
            "stdout differs:\n{}",
            diff_text(&vm.stdout, &wasm.stdout)
        );
    }
    if vm.stderr != wasm.stderr {
        let _ = write!(
            out,
            "stderr differs:\n{}",
            diff_text(&vm.stderr, &wasm.stderr)
        );
    }
    let trees = diff_trees(&vm.tree, &wasm.tree);
    if !trees.is_empty() {
        let _ = write!(out, "the trees afterwards differ:\n{trees}");
    }
    out
}

/// Runs `case` both ways and asserts the answers are byte-identical, then that the reference
/// did what the case expects of it. Skipped (with a loud message) without /dev/kvm, except
/// under CI.
fn check(case: &Case) {
    if !kvm_available() {
        return;
    }
    guest_image();
    let wasm = run_case(case, "wasm");
    let vm = run_case(case, "vm");
    let report = differences(&vm, &wasm);
    assert!(
        report.is_empty(),
        "{} {:?} (stdin {} bytes) differs between --isolation vm and --isolation wasm:\n{report}",
        case.program,
        case.args,
        case.stdin.len()
    );
    // The case itself: the reference gives the expected exit code and writes what it should.
    assert_eq!(
        wasm.exit,
        Some(case.exit),
        "{} {:?}: the reference's exit code\nstdout: {}\nstderr: {}",
        case.program,
        case.args,
        String::from_utf8_lossy(&wasm.stdout),
        String::from_utf8_lossy(&wasm.stderr)
    );
    let before = {
        let scratch = scratch_dir(&format!("real-{}-before", case.name));
        sample_tree(&scratch.join("tree"));
        let tree = snapshot(&scratch.join("tree"));
        let _ = std::fs::remove_dir_all(&scratch);
        tree
    };
    let changed: Vec<&String> = wasm
        .tree
        .iter()
        .filter(|(path, entry)| before.get(*path) != Some(entry))
        .map(|(path, _)| path)
        .chain(before.keys().filter(|path| !wasm.tree.contains_key(*path)))
        .collect();
    let expected: Vec<String> = case.writes.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(
        changed,
        expected.iter().collect::<Vec<_>>(),
        "{} {:?}: the paths the call changed",
        case.program,
        case.args
    );
    // Kept when the case fails, for a look.
    for answer in [&vm, &wasm] {
        let _ = std::fs::remove_dir_all(&answer.scratch);
    }
}

// ---------------------------------------------------------------------------------------------
// ripgrep

#[test]
fn rg_line_numbers_in_one_file() {
    check(&Case {
        name: "rg-line-numbers",
        program: "rg",
        args: &["--line-number", "hello", "notes.txt"],
        ..Case::default()
    });
}

#[test]
fn rg_case_insensitive_regex_with_context() {
    check(&Case {
        name: "rg-regex-context",
        program: "rg",
        args: &["-n", "-i", "-C1", r"^error:\s+\w+", "notes.txt"],
        ..Case::default()
    });
}

#[test]
fn rg_no_match_exits_1() {
    check(&Case {
        name: "rg-no-match",
        program: "rg",
        args: &["zebra[0-9]+quux"],
        exit: 1,
        ..Case::default()
    });
}

#[test]
fn rg_walks_the_tree_sorted() {
    check(&Case {
        name: "rg-walk-sorted",
        program: "rg",
        args: &["--sort", "path", "-n", "TODO"],
        ..Case::default()
    });
}

/// Without --sort, ripgrep prints in the order the directory listings gave: the guest's
/// fd_readdir order must be the reference's.
#[test]
fn rg_walks_the_tree_in_readdir_order() {
    check(&Case {
        name: "rg-walk-readdir",
        program: "rg",
        args: &["TODO"],
        ..Case::default()
    });
}

#[test]
fn rg_walks_an_absolute_path_sorted() {
    check(&Case {
        name: "rg-walk-absolute",
        program: "rg",
        guest_dir: "/work",
        args: &["--sort", "path", "-c", "fn ", "/work"],
        ..Case::default()
    });
}

#[test]
fn rg_lists_files_sorted() {
    check(&Case {
        name: "rg-files-sorted",
        program: "rg",
        args: &["--files", "--sort", "path"],
        ..Case::default()
    });
}

#[test]
fn rg_lists_files_in_readdir_order() {
    check(&Case {
        name: "rg-files-readdir",
        program: "rg",
        args: &["--files"],
        ..Case::default()
    });
}

#[test]
fn rg_lists_hidden_and_ignored_files_too() {
    check(&Case {
        name: "rg-files-all",
        program: "rg",
        args: &["-uuu", "--files", "--sort", "path"],
        ..Case::default()
    });
}

#[test]
fn rg_reports_a_binary_file_it_was_given() {
    check(&Case {
        name: "rg-binary",
        program: "rg",
        args: &["TODO", "data/blob.bin", "notes.txt"],
        ..Case::default()
    });
}

#[test]
fn rg_replaces_with_capture_groups() {
    check(&Case {
        name: "rg-replace",
        program: "rg",
        args: &[
            "--sort",
            "path",
            "--no-filename",
            "-o",
            "-r",
            "$2<-$1",
            r"pub fn (\w+)\((\w+)",
            "src",
        ],
        ..Case::default()
    });
}

#[test]
fn rg_counts_matches_in_a_large_file() {
    check(&Case {
        name: "rg-large-file",
        program: "rg",
        args: &[
            "-n",
            "--column",
            r"\bERROR\b.*took (1\d\d|3\d) ms",
            "data/big.log",
        ],
        ..Case::default()
    });
}

#[test]
fn rg_searches_standard_input() {
    check(&Case {
        name: "rg-stdin",
        program: "rg",
        args: &["-n", "b.r", "-"],
        stdin: b"foo\nbar\nbaz\nbor\n",
        ..Case::default()
    });
}

#[test]
fn rg_missing_file_exits_2() {
    check(&Case {
        name: "rg-missing-file",
        program: "rg",
        args: &["hello", "no-such-file.txt"],
        exit: 2,
        ..Case::default()
    });
}

#[test]
fn rg_bad_regex_exits_2() {
    check(&Case {
        name: "rg-bad-regex",
        program: "rg",
        args: &["unclosed(group"],
        exit: 2,
        ..Case::default()
    });
}

// ---------------------------------------------------------------------------------------------
// jaq

#[test]
fn jaq_filters_a_file_in_the_tree() {
    check(&Case {
        name: "jaq-file",
        program: "jaq",
        args: &[
            r#"[.[] | select(.age > 30) | {name, points, tags: (.tags | length)}]"#,
            "data/users.json",
        ],
        ..Case::default()
    });
}

#[test]
fn jaq_aggregates_a_large_file() {
    check(&Case {
        name: "jaq-large-file",
        program: "jaq",
        args: &[
            "-c",
            "map(select(.even)) | {n: length, top: (sort_by(-.score) | .[:3] | map(.name)), sum: (map(.score) | add)}",
            "data/big.json",
        ],
        ..Case::default()
    });
}

#[test]
fn jaq_filters_standard_input() {
    check(&Case {
        name: "jaq-stdin",
        program: "jaq",
        args: &["-c", "(map(.points) | add), (.[0] | keys)"],
        stdin: br#"[{"points": 1, "b": 2}, {"points": 2.5}, {"points": -3}]"#,
        ..Case::default()
    });
}

#[test]
fn jaq_raw_output_of_several_files_with_an_env_var() {
    check(&Case {
        name: "jaq-raw-env",
        program: "jaq",
        env: &["GREETING=hi there"],
        args: &[
            "-r",
            r#"$ENV.GREETING + ": " + (.name? // (.[0].name))"#,
            "data/config.json",
            "data/users.json",
        ],
        ..Case::default()
    });
}

/// jaq -i writes a temporary file beside the input and renames it over the input, then copies
/// the input's permissions with std::fs::set_permissions, which wasi-libc's chmod refuses with
/// ENOSYS (no WASI call exists for it): jaq exits 2, so the tree comes back unchanged.
#[test]
fn jaq_in_place_fails_at_chmod_and_leaves_the_tree() {
    check(&Case {
        name: "jaq-in-place",
        program: "jaq",
        args: &[
            "-i",
            "--indent",
            "4",
            ".version += 1 | .limits |= map(. * 2)",
            "data/config.json",
        ],
        exit: 2,
        ..Case::default()
    });
}

#[test]
fn jaq_invalid_json_input_fails() {
    check(&Case {
        name: "jaq-bad-input",
        program: "jaq",
        args: &[".a"],
        stdin: b"{\"a\": 1}\n{\"a\": oops}\n",
        exit: 5,
        ..Case::default()
    });
}

#[test]
fn jaq_filter_error_fails() {
    check(&Case {
        name: "jaq-runtime-error",
        program: "jaq",
        args: &[".[0] + 1", "data/users.json"],
        exit: 5,
        ..Case::default()
    });
}

#[test]
fn jaq_missing_file_fails() {
    check(&Case {
        name: "jaq-missing-file",
        program: "jaq",
        args: &[".", "data/nope.json"],
        exit: 2,
        ..Case::default()
    });
}

// ---------------------------------------------------------------------------------------------
// comrak

#[test]
fn comrak_renders_gfm_to_stdout() {
    check(&Case {
        name: "comrak-gfm",
        program: "comrak",
        args: &["--gfm", "-e", "footnotes", "README.md"],
        ..Case::default()
    });
}

#[test]
fn comrak_writes_an_output_file() {
    check(&Case {
        name: "comrak-output",
        program: "comrak",
        args: &[
            "--gfm",
            "--header-id-prefix",
            "h-",
            "-o",
            "docs/guide.html",
            "docs/guide.md",
        ],
        writes: &["docs/guide.html"],
        ..Case::default()
    });
}

#[test]
fn comrak_reformats_a_file_in_place() {
    check(&Case {
        name: "comrak-in-place",
        program: "comrak",
        args: &["-i", "--width", "40", "docs/guide.md"],
        writes: &["docs/guide.md"],
        ..Case::default()
    });
}

#[test]
fn comrak_renders_standard_input_as_xml() {
    check(&Case {
        name: "comrak-stdin-xml",
        program: "comrak",
        args: &["--to", "xml", "--sourcepos", "--smart"],
        stdin: b"# T\n\n\"quoted\" -- text with `code`\n\n1. one\n2. two\n",
        ..Case::default()
    });
}

#[test]
fn comrak_missing_file_fails() {
    check(&Case {
        name: "comrak-missing-file",
        program: "comrak",
        args: &["docs/none.md"],
        exit: 3,
        ..Case::default()
    });
}

// ---------------------------------------------------------------------------------------------
// The comparison itself

/// The comparison finds a difference in each place it looks (so a case cannot pass because the
/// check looks at nothing).
#[test]
fn the_comparison_sees_every_kind_of_difference() {
    let scratch = scratch_dir("real-compare");
    let dir = scratch.join("tree");
    sample_tree(&dir);
    let base = Answer {
        exit: Some(0),
        stdout: b"a\nb\n".to_vec(),
        stderr: Vec::new(),
        tree: snapshot(&dir),
        scratch,
    };
    assert_eq!(differences(&base, &base), "");
    assert!(base.tree.contains_key("empty"));
    assert!(base.tree.contains_key("data/blob.bin"));
    assert!(base.tree.contains_key("docs/deep/nested/leaf.txt"));
    let other = |f: &dyn Fn(&mut Answer)| {
        let mut a = Answer {
            exit: base.exit,
            stdout: base.stdout.clone(),
            stderr: base.stderr.clone(),
            tree: base.tree.clone(),
            scratch: base.scratch.clone(),
        };
        f(&mut a);
        differences(&a, &base)
    };
    assert!(other(&|a| a.exit = Some(1)).starts_with("exit code: vm Some(1), wasm Some(0)"));
    let d = other(&|a| a.stdout = b"a\nB\n".to_vec());
    assert!(d.contains("- \"B\\n\"") && d.contains("+ \"b\\n\""), "{d}");
    assert!(other(&|a| a.stderr = b"x".to_vec()).starts_with("stderr differs"));
    let d = other(&|a| {
        a.tree
            .insert("notes.txt".into(), Entry::File(b"changed\n".to_vec()));
    });
    assert!(d.contains("notes.txt: contents differ"), "{d}");
    let d = other(&|a| {
        a.tree.remove("empty");
    });
    assert!(
        d.contains("empty: vm has nothing there, wasm has a directory"),
        "{d}"
    );
    let d = other(&|a| {
        a.tree.insert("new".into(), Entry::Dir);
    });
    assert!(
        d.contains("new: vm has a directory, wasm has nothing there"),
        "{d}"
    );
    let d = other(&|a| {
        a.tree.insert("data/blob.bin".into(), Entry::Dir);
    });
    assert!(
        d.contains("data/blob.bin: vm has a directory, wasm has a file of 36 bytes"),
        "{d}"
    );
    let _ = std::fs::remove_dir_all(&base.scratch);
}
