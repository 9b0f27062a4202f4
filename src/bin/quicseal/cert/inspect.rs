//! `quicseal cert inspect`.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug)]
pub(super) struct InspectArgs {
    /// A PEM certificate, chain or CRL.
    file: PathBuf,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

pub(super) fn inspect(a: InspectArgs, out: &mut impl Write, err: &mut impl Write) -> crate::Result<u8> {
    let bytes = std::fs::read(&a.file)
        .map_err(|e| crate::CliError::Input(format!("{}: cannot read it: {e}", a.file.display())))?;
    let inspection = quicseal::pki::inspect_pem(&bytes)
        .map_err(|e| crate::CliError::Input(format!("{}: {}", a.file.display(), crate::sentence(&e))))?;
    for label in &inspection.skipped {
        writeln!(err, "skipping a PEM `{label}` section")?;
    }
    let reports = inspection.reports;
    if a.json {
        let mut reports: Vec<serde_json::Value> = reports
            .into_iter()
            .map(|r| serde_json::Value::Object(r.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
            .collect();
        let v = if reports.len() == 1 { reports.remove(0) } else { serde_json::Value::Array(reports) };
        writeln!(out, "{}", serde_json::to_string_pretty(&v).map_err(|e| crate::CliError::Input(e.to_string()))?)?;
        return Ok(0);
    }
    for (i, r) in reports.iter().enumerate() {
        if i > 0 {
            writeln!(out)?;
        }
        for (k, v) in r {
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(items) if items.is_empty() => "-".to_owned(),
                serde_json::Value::Array(items) => items
                    .iter()
                    .map(|x| x.as_str().map(str::to_owned).unwrap_or_else(|| x.to_string()))
                    .collect::<Vec<_>>()
                    .join(", "),
                serde_json::Value::Null => "-".to_owned(),
                other => other.to_string(),
            };
            writeln!(out, "{k:<13} {v}")?;
        }
    }
    Ok(0)
}
