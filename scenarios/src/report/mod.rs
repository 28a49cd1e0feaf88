//! Reports: the JSON document (`json`) and its self-contained HTML rendering (`html`).

pub mod html;
pub mod json;
