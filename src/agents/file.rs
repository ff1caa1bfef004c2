//! Reading `AGENTS_FILE` (TOML) into an [`Agents`](super::Agents) directory.
