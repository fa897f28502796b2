//! A horizontal bar chart of ratios (ours ÷ reference) as a self-contained SVG, for the docs: one bar per figure,
//! a line at 1× (parity), bars left of it where ours is smaller (less memory, less time), on a log scale so 0.5×
//! and 2× are the same distance from parity.

/// One bar: its label and the ratio.
pub struct Bar {
    /// What was measured, e.g. "5000 agents: server KiB per agent".
    pub label: String,
    /// Ours ÷ reference.
    pub ratio: f64,
}

const WIDTH: f64 = 900.0;
const LABEL_WIDTH: f64 = 380.0;
const ROW: f64 = 26.0;
const TOP: f64 = 48.0;
/// The axis spans 1/RANGE to RANGE.
const RANGE: f64 = 4.0;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The chart; `title` on top, `note` under the axis.
pub fn ratio_chart(title: &str, note: &str, bars: &[Bar]) -> String {
    let plot = WIDTH - LABEL_WIDTH - 70.0;
    let x = |ratio: f64| {
        let r = ratio.clamp(1.0 / RANGE, RANGE);
        LABEL_WIDTH + plot * (r.log(RANGE) + 1.0) / 2.0
    };
    let height = TOP + ROW * bars.len() as f64 + 56.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" font-family=\"sans-serif\" \
         font-size=\"13\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"24\" font-size=\"16\" font-weight=\"bold\">{}</text>\n",
        escape(title)
    );
    for (i, bar) in bars.iter().enumerate() {
        let y = TOP + ROW * i as f64;
        let (from, to) = (x(1.0).min(x(bar.ratio)), x(1.0).max(x(bar.ratio)));
        let color = if bar.ratio <= 1.0 { "#2e7d32" } else { "#c62828" };
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n\
             <rect x=\"{from:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\">{:.2}×</text>\n",
            LABEL_WIDTH - 8.0,
            y + 17.0,
            escape(&bar.label),
            y + 5.0,
            (to - from).max(1.0),
            ROW - 10.0,
            to + 4.0,
            y + 17.0,
            bar.ratio
        ));
    }
    let bottom = TOP + ROW * bars.len() as f64;
    for tick in [0.25, 0.5, 1.0, 2.0, 4.0] {
        let tx = x(tick);
        let dash = if tick == 1.0 { "" } else { " stroke-dasharray=\"3,3\"" };
        svg.push_str(&format!(
            "<line x1=\"{tx:.1}\" y1=\"{:.1}\" x2=\"{tx:.1}\" y2=\"{bottom:.1}\" stroke=\"#555\"{dash}/>\n\
             <text x=\"{tx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{tick}×</text>\n",
            TOP - 4.0,
            bottom + 16.0
        ));
    }
    svg.push_str(&format!(
        "<text x=\"{LABEL_WIDTH}\" y=\"{:.1}\" fill=\"#555\">{}</text>\n</svg>\n",
        bottom + 40.0,
        escape(note)
    ));
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_sit_on_their_side_of_parity_and_text_is_escaped() {
        let svg = ratio_chart(
            "a <title>",
            "note & more",
            &[Bar { label: "smaller".into(), ratio: 0.5 }, Bar { label: "larger".into(), ratio: 2.0 }],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("a &lt;title&gt;") && svg.contains("note &amp; more"));
        assert!(svg.contains("0.50×") && svg.contains("2.00×"));
        assert!(svg.contains("#2e7d32") && svg.contains("#c62828"));
    }
}
