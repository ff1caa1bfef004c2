//! Small value types with parsing rules, shared by the webhook, bridge and API layers.

pub mod phone;
