//! The effective value of every flag, logged once at start as `FLAG: --name="value"` (the form Kubernetes
//! components print at `-v=1`), so an operator can see what a process really runs with, defaults included.
//! Values of flags whose names say they hold a secret are never printed; paths to secrets are fine.

use crate::klog_format::go_quote;
use clap::{ArgAction, ArgMatches, Command};

/// What is printed instead of a secret's value.
pub const REDACTED: &str = "<redacted>";

/// Every flag of a parsed command line with its effective value, in the command's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EffectiveFlags {
    flags: Vec<(String, String)>,
}

impl EffectiveFlags {
    /// The flags of `command` with their values in `matches` (given or defaulted; unset flags have an empty
    /// value, as Go prints an unset string). `--help` and `--version` are left out; a flag given more than once
    /// lists its values joined with commas.
    pub fn new(command: &Command, matches: &ArgMatches) -> Self {
        let mut flags = Vec::new();
        for arg in command.get_arguments() {
            let Some(name) = arg.get_long() else { continue };
            if matches!(
                arg.get_action(),
                ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
            ) {
                continue;
            }
            let id = arg.get_id().as_str();
            let value = match matches.get_raw(id) {
                Some(values) => values.map(|v| v.to_string_lossy().into_owned()).collect::<Vec<_>>().join(","),
                None => String::new(),
            };
            let value = if is_secret(name) && !value.is_empty() { REDACTED.to_string() } else { value };
            flags.push((name.to_string(), value));
        }
        Self { flags }
    }

    /// Parses `args` with `T`'s command, exiting as clap does on an error or `--help`, and returns the flags
    /// with their effective values.
    pub fn parse<T: clap::Parser>(args: impl IntoIterator<Item = String>) -> (T, Self) {
        match Self::try_parse(args) {
            Ok(parsed) => parsed,
            Err(e) => e.exit(),
        }
    }

    /// Like [`EffectiveFlags::parse`], returning the error.
    pub fn try_parse<T: clap::Parser>(args: impl IntoIterator<Item = String>) -> Result<(T, Self), clap::Error> {
        let command = T::command();
        let matches = command.clone().try_get_matches_from(args)?;
        let parsed = T::from_arg_matches(&matches)?;
        Ok((parsed, Self::new(&command, &matches)))
    }

    /// `(name, value)` pairs, secrets redacted.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.flags
    }

    /// The lines to log: `FLAG: --name="value"`, the value quoted as Go's `%q` does.
    pub fn lines(&self) -> Vec<String> {
        self.flags.iter().map(|(name, value)| format!("FLAG: --{name}={}", go_quote(value))).collect()
    }

    /// Logs [`EffectiveFlags::lines`] at info, one event each (as the reference logs one line per flag).
    pub fn log(&self) {
        for line in self.lines() {
            tracing::info!("{line}");
        }
    }
}

/// Whether a flag named `name` holds a secret itself (a token, a password, a key's contents) rather than a path.
pub fn is_secret(name: &str) -> bool {
    let holds_secret = ["token", "password", "secret", "private-key", "bearer"].iter().any(|w| name.contains(w));
    let is_a_path = ["-path", "-file", "-dir", "-name"].iter().any(|w| name.ends_with(w));
    holds_secret && !is_a_path
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Flags {
        /// A path.
        #[arg(long, default_value = "/etc/ca.crt")]
        ca_cert: String,
        /// A secret.
        #[arg(long, default_value = "")]
        agent_token: String,
        /// A path to a secret.
        #[arg(long, default_value = "")]
        service_account_token_path: String,
        /// Unset.
        #[arg(long)]
        log_dir: Option<String>,
        /// A list.
        #[arg(long)]
        addresses: Vec<String>,
        /// A switch.
        #[arg(long, action = ArgAction::Set, default_value = "true")]
        enabled: bool,
        #[arg(short = 'v', long = "v", default_value_t = 4)]
        v: u32,
    }

    fn args(list: &[&str]) -> Vec<String> {
        std::iter::once("prog").chain(list.iter().copied()).map(String::from).collect()
    }

    #[test]
    fn every_flag_with_its_value_and_no_secret() {
        let (flags, effective) = EffectiveFlags::try_parse::<Flags>(args(&[
            "--agent-token=s3cr3t",
            "--service-account-token-path=/var/run/token",
            "--addresses=a:1",
            "--addresses=b:2",
            "--enabled=false",
            "-v=7",
            "--ca-cert=/x \"y\"",
        ]))
        .expect("parse");
        assert_eq!(flags.agent_token, "s3cr3t");
        assert_eq!(
            effective.lines(),
            [
                r#"FLAG: --ca-cert="/x \"y\"""#,
                r#"FLAG: --agent-token="<redacted>""#,
                r#"FLAG: --service-account-token-path="/var/run/token""#,
                r#"FLAG: --log-dir="""#,
                r#"FLAG: --addresses="a:1,b:2""#,
                r#"FLAG: --enabled="false""#,
                r#"FLAG: --v="7""#,
            ]
        );
        let (_, defaults) = EffectiveFlags::try_parse::<Flags>(args(&[])).expect("parse");
        assert_eq!(defaults.pairs()[0], ("ca-cert".to_string(), "/etc/ca.crt".to_string()));
        assert_eq!(defaults.pairs()[1], ("agent-token".to_string(), String::new()));
        assert_eq!(defaults.pairs()[5], ("enabled".to_string(), "true".to_string()));
    }

    #[test]
    fn secret_names() {
        for secret in ["agent-token", "token", "password", "client-secret", "bearer-token"] {
            assert!(is_secret(secret), "{secret}");
        }
        for plain in ["service-account-token-path", "token-file", "ca-cert", "client-key", "kubeconfig"] {
            assert!(!is_secret(plain), "{plain}");
        }
    }
}
