//! A finished (or failed) call as an MCP tool result: text content for the agent to read, the
//! same facts as `structuredContent`, and `isError` for anything but an exit with code 0.

use bulwark_proto::call::Outcome;
use rmcp::model::{CallToolResult, ContentBlock};
use schemars::JsonSchema;
use serde::Serialize;

use crate::call::{CallError, Finished, code};

/// How a call ended, as `structuredContent.outcome` says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Ended {
    /// The tool exited (`exit_code` is its code; 255 for one outside 0..=255).
    Exited,
    /// The tool trapped (a WebAssembly trap: unreachable, out-of-bounds access, ...).
    Trapped,
    /// The tool used up its fuel budget.
    OutOfFuel,
    /// The call's time limit (`bulwark mcp --timeout`) ran out; the VM was killed.
    TimedOut,
    /// The call was cancelled (by the client, or the server shutting down).
    Cancelled,
    /// A policy refused the module before it ran.
    Refused,
    /// The module cannot be read, compiled or loaded (for example, an unknown import).
    ModuleError,
    /// Bulwark itself failed (the VM, the cache, the guest agent).
    Failed,
    /// The tool's arguments are not what its input schema asks for; nothing ran.
    InvalidArguments,
}

/// How a tool call ended: its exit code, outcome and output (the `structuredContent` of every
/// tool's result; this schema is each tool's `outputSchema`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, JsonSchema)]
pub struct RunResult {
    /// The exit status `bulwark run` would give: the tool's exit code, or 124 (timed out),
    /// 125 (Bulwark failed, or invalid arguments), 126 (the module cannot run), 130
    /// (cancelled), 134 (trap or out of fuel).
    pub exit_code: u8,
    /// How the call ended.
    pub outcome: Ended,
    /// The tool's standard output (bytes that are not UTF-8 are replaced with U+FFFD).
    pub stdout: String,
    /// The tool's standard error (bytes that are not UTF-8 are replaced with U+FFFD).
    pub stderr: String,
    /// Output past the limit was dropped.
    pub output_truncated: bool,
    /// What went wrong, when something did: the trap, the timeout, the failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl RunResult {
    /// The result of a call that ran (or tried to).
    pub fn of(result: &Result<Finished, CallError>) -> Self {
        match result {
            Ok(finished) => {
                let r = &finished.response;
                let (outcome, message) = match &r.outcome {
                    Outcome::Exited(_) => (Ended::Exited, None),
                    Outcome::Trap(msg) => (Ended::Trapped, Some(msg.clone())),
                    Outcome::OutOfFuel => (Ended::OutOfFuel, Some("all fuel consumed".into())),
                    Outcome::Refused(msg) => (Ended::ModuleError, Some(msg.clone())),
                    Outcome::AgentFailed(msg) => (
                        Ended::Failed,
                        Some(format!("the guest agent failed: {msg}")),
                    ),
                };
                Self {
                    exit_code: finished.exit_code(),
                    outcome,
                    stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
                    output_truncated: r.output_truncated,
                    message,
                }
            }
            Err(e) => {
                let outcome = match e {
                    CallError::TimedOut { .. } => Ended::TimedOut,
                    CallError::Cancelled => Ended::Cancelled,
                    CallError::Refused(_) => Ended::Refused,
                    CallError::Module(_) => Ended::ModuleError,
                    CallError::Bulwark(_) => Ended::Failed,
                };
                Self::nothing_ran(outcome, e.exit_code(), e.to_string())
            }
        }
    }

    /// The result of a call whose arguments were refused before anything ran.
    pub fn invalid_arguments(message: String) -> Self {
        Self::nothing_ran(Ended::InvalidArguments, code::BULWARK, message)
    }

    fn nothing_ran(outcome: Ended, exit_code: u8, message: String) -> Self {
        Self {
            exit_code,
            outcome,
            stdout: String::new(),
            stderr: String::new(),
            output_truncated: false,
            message: Some(message),
        }
    }

    /// Whether the call failed: anything but an exit with code 0.
    pub fn is_error(&self) -> bool {
        !(self.outcome == Ended::Exited && self.exit_code == 0)
    }

    /// The line that says how the call ended, when it did not simply exit 0.
    fn status_line(&self) -> Option<String> {
        let message = self.message.as_deref().unwrap_or("");
        let line = match self.outcome {
            Ended::Exited if self.exit_code == 0 => return None,
            Ended::Exited => {
                return Some(format!(
                    "[bulwark] the tool exited with code {}",
                    self.exit_code
                ));
            }
            Ended::Trapped => format!("the tool trapped: {message}"),
            Ended::OutOfFuel => "the tool ran out of fuel".to_owned(),
            Ended::TimedOut | Ended::Cancelled | Ended::Refused | Ended::Failed => {
                message.to_owned()
            }
            Ended::ModuleError => format!("the module cannot run: {message}"),
            Ended::InvalidArguments => format!("invalid arguments: {message}"),
        };
        Some(format!("[bulwark] {line} (exit code {})", self.exit_code))
    }

    /// The MCP result: content blocks (stdout; then `[stderr]` and its text, if any; then a
    /// `[bulwark]` line when the call did not exit 0 or its output was cut), this value as
    /// `structuredContent`, and `isError`.
    pub fn into_tool_result(self) -> CallToolResult {
        let mut content = vec![ContentBlock::text(self.stdout.clone())];
        if !self.stderr.is_empty() {
            content.push(ContentBlock::text(format!("[stderr]\n{}", self.stderr)));
        }
        let mut status: Vec<String> = self.status_line().into_iter().collect();
        if self.output_truncated {
            status.push("[bulwark] output past the limit was dropped".to_owned());
        }
        if !status.is_empty() {
            content.push(ContentBlock::text(status.join("\n")));
        }
        let is_error = self.is_error();
        let structured = serde_json::to_value(&self).unwrap_or_default();
        let mut result = if is_error {
            CallToolResult::error(content)
        } else {
            CallToolResult::success(content)
        };
        result.structured_content = Some(structured);
        result
    }
}

#[cfg(test)]
mod tests {
    use bulwark_proto::call::Response;

    use super::*;
    use crate::call::Timings;

    fn finished(outcome: Outcome, stdout: &[u8], stderr: &[u8]) -> Result<Finished, CallError> {
        let mut response = Response::new(outcome);
        response.stdout = stdout.to_vec();
        response.stderr = stderr.to_vec();
        Ok(Finished {
            response,
            changes: Vec::new(),
            files: Vec::new(),
            timings: Timings::default(),
        })
    }

    fn texts(result: &CallToolResult) -> Vec<String> {
        result
            .content
            .iter()
            .map(|c| c.as_text().map(|t| t.text.clone()).unwrap_or_default())
            .collect()
    }

    #[test]
    fn exit_0_is_success_with_stdout_first() {
        let r = RunResult::of(&finished(Outcome::Exited(0), b"2\n", b"")).into_tool_result();
        assert_eq!(r.is_error, Some(false));
        assert_eq!(texts(&r), ["2\n"]);
        let s = r.structured_content.unwrap();
        assert_eq!(s["exit_code"], 0);
        assert_eq!(s["outcome"], "exited");
        assert_eq!(s["stdout"], "2\n");
        assert_eq!(s["output_truncated"], false);
        assert!(s.get("message").is_none());
    }

    #[test]
    fn a_nonzero_exit_is_an_error_with_stderr_labelled() {
        let r =
            RunResult::of(&finished(Outcome::Exited(1), b"", b"Traceback\n")).into_tool_result();
        assert_eq!(r.is_error, Some(true));
        assert_eq!(
            texts(&r),
            [
                "",
                "[stderr]\nTraceback\n",
                "[bulwark] the tool exited with code 1"
            ]
        );
        let r = RunResult::of(&finished(Outcome::Exited(256), b"", b"")).into_tool_result();
        assert_eq!(r.is_error, Some(true));
        assert_eq!(r.structured_content.unwrap()["exit_code"], 255);
    }

    #[test]
    fn traps_and_errors_say_what_happened() {
        let r = RunResult::of(&finished(Outcome::Trap("unreachable".into()), b"", b""))
            .into_tool_result();
        assert_eq!(r.is_error, Some(true));
        let s = r.structured_content.unwrap();
        assert_eq!(s["outcome"], "trapped");
        assert_eq!(s["exit_code"], 134);
        assert_eq!(s["message"], "unreachable");
        let timed_out: Result<Finished, CallError> = Err(CallError::TimedOut {
            message: "timed out after 1s".into(),
            timings: Timings::default(),
        });
        let r = RunResult::of(&timed_out).into_tool_result();
        assert_eq!(r.is_error, Some(true));
        let s = r.structured_content.clone().unwrap();
        assert_eq!(s["outcome"], "timed_out");
        assert_eq!(s["exit_code"], 124);
        assert!(texts(&r)[1].contains("timed out after 1s"));
        let r = RunResult::invalid_arguments("missing field `code`".into()).into_tool_result();
        assert_eq!(r.is_error, Some(true));
        assert_eq!(
            r.structured_content.unwrap()["outcome"],
            "invalid_arguments"
        );
    }

    #[test]
    fn output_that_is_not_utf8_is_converted_lossily() {
        let r = RunResult::of(&finished(Outcome::Exited(0), b"a\xffb", b"\xfe")).into_tool_result();
        let s = r.structured_content.unwrap();
        assert_eq!(s["stdout"], "a\u{fffd}b");
        assert_eq!(s["stderr"], "\u{fffd}");
    }
}
