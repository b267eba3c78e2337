//! `bulwark compile` as a user runs it.

use std::process::Command;

#[test]
fn compile_writes_the_artifact_and_reports_it() {
    let dir = std::env::temp_dir().join(format!("bulwark-compile-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("t.wat");
    std::fs::write(
        &input,
        r#"(module (func (export "run") (result i64) i64.const 7))"#,
    )
    .unwrap();
    let output = dir.join("t.cwasm");
    let out = Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .arg("compile")
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("compiled "), "{text}");
    assert!(text.contains("sha256 "), "{text}");
    let artifact = std::fs::read(&output).unwrap();
    assert_eq!(&artifact[..4], b"\x7fELF");

    let bad = dir.join("bad.wasm");
    std::fs::write(&bad, b"not wasm").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args([
            "compile".as_ref(),
            bad.as_os_str(),
            "-o".as_ref(),
            dir.join("x").as_os_str(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bad.wasm"), "{err}");
    assert!(!dir.join("x").exists(), "no output on failure");
    std::fs::remove_dir_all(dir).unwrap();
}
