//! How the gateway's memory grows with idle connections: its resident memory sampled while
//! the connections open, and the straight line through those samples. The slope is what each
//! added connection costs; how well a line fits (R²) says whether the growth is linear.

use serde::Serialize;

/// The gateways' resident memory with this many connections open.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MemoryPoint {
    pub connections: u64,
    pub rss_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct IdleMemory {
    /// From before the first connection to all of them open.
    pub points: Vec<MemoryPoint>,
    /// The least-squares line through the points: resident bytes per added connection...
    pub bytes_per_connection_fit: f64,
    /// ...and its intercept (the memory with no connection).
    pub rss_bytes_at_zero_fit: f64,
    /// 1.0 when every point is on the line.
    pub r_squared: f64,
}

impl IdleMemory {
    /// `None` with fewer than three distinct connection counts (no line worth the name).
    pub fn fit(points: Vec<MemoryPoint>) -> Option<IdleMemory> {
        let xy: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.connections as f64, p.rss_bytes as f64))
            .collect();
        let line = Line::fit(&xy)?;
        Some(IdleMemory {
            points,
            bytes_per_connection_fit: line.slope,
            rss_bytes_at_zero_fit: line.intercept,
            r_squared: line.r_squared,
        })
    }
}

/// A least-squares straight line.
#[derive(Debug, PartialEq)]
struct Line {
    slope: f64,
    intercept: f64,
    r_squared: f64,
}

impl Line {
    fn fit(points: &[(f64, f64)]) -> Option<Line> {
        let mut xs: Vec<f64> = points.iter().map(|(x, _)| *x).collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        if xs.len() < 3 {
            return None;
        }
        let n = points.len() as f64;
        let mean_x = points.iter().map(|(x, _)| x).sum::<f64>() / n;
        let mean_y = points.iter().map(|(_, y)| y).sum::<f64>() / n;
        let sxx: f64 = points.iter().map(|(x, _)| (x - mean_x).powi(2)).sum();
        let sxy: f64 = points
            .iter()
            .map(|(x, y)| (x - mean_x) * (y - mean_y))
            .sum();
        let syy: f64 = points.iter().map(|(_, y)| (y - mean_y).powi(2)).sum();
        let slope = sxy / sxx;
        let intercept = mean_y - slope * mean_x;
        let residual: f64 = points
            .iter()
            .map(|(x, y)| (y - (intercept + slope * x)).powi(2))
            .sum();
        // A flat, exactly level series is a perfect (if dull) fit.
        let r_squared = if syy == 0.0 {
            1.0
        } else {
            1.0 - residual / syy
        };
        Some(Line {
            slope,
            intercept,
            r_squared,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_straight_series_fits_exactly() {
        let points: Vec<(f64, f64)> = (0..10)
            .map(|i| (i as f64 * 1000.0, 20e6 + i as f64 * 1000.0 * 4500.0))
            .collect();
        let line = Line::fit(&points).unwrap();
        assert!((line.slope - 4500.0).abs() < 1e-6, "{line:?}");
        assert!((line.intercept - 20e6).abs() < 1e-3, "{line:?}");
        assert!((line.r_squared - 1.0).abs() < 1e-12, "{line:?}");
    }

    #[test]
    fn a_curve_fits_worse_than_a_line() {
        // Memory that grows with the square of the connections is not linear.
        let points: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, (i * i) as f64)).collect();
        let line = Line::fit(&points).unwrap();
        assert!(line.r_squared < 0.97, "{line:?}");
        let noisy: Vec<(f64, f64)> = (0..10)
            .map(|i| {
                (
                    i as f64,
                    10.0 * i as f64 + if i % 2 == 0 { 1.0 } else { -1.0 },
                )
            })
            .collect();
        let line = Line::fit(&noisy).unwrap();
        assert!(line.r_squared > 0.99 && line.r_squared < 1.0, "{line:?}");
    }

    #[test]
    fn too_few_distinct_counts_make_no_line() {
        assert_eq!(Line::fit(&[]), None);
        assert_eq!(Line::fit(&[(1.0, 2.0), (1.0, 3.0), (2.0, 4.0)]), None);
        assert!(Line::fit(&[(1.0, 2.0), (2.0, 3.0), (3.0, 4.0)]).is_some());
        let points = vec![
            MemoryPoint {
                connections: 0,
                rss_bytes: 100,
            };
            5
        ];
        assert!(IdleMemory::fit(points).is_none());
    }
}
