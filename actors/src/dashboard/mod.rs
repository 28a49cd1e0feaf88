//! The `/dashboard` page: one HTML document with its CSS and JS inlined, assembled at compile
//! time from the files beside this one, so the node serves it with no CDN, no build step and
//! no files on disk. The script polls `/api/stats` every second and draws with canvas.
//!
//! Every number the page shows carries `data-k` (its path in the stats document) and `data-v`
//! (the raw value), so tests and scrapers can check it against `/api/stats`.

/// The whole page.
pub const PAGE: &str = concat!(
    "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
    "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
    "<title>PegaFlow node</title><style>\n",
    include_str!("style.css"),
    "</style></head><body>\n",
    include_str!("body.html"),
    "<script>\n",
    include_str!("app.js"),
    "</script></body></html>\n"
);
