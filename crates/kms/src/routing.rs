//! Widest shortest paths: the one route search of the workspace.
//!
//! Both the trusted-node relay ([`crate::relay`], choosing the route a key takes
//! now) and the network planner (`qkdnet plan`, predicting the routes of a day's
//! demand) use this search, so the planner predicts the routes the network
//! takes. The rule: the path with the **fewest hops** over links whose width (key
//! available, or a model rate) is at least `need`; among those, the **largest
//! bottleneck** (the smallest width along the path); among those, the first found
//! by a search that visits each node's neighbours in **name order** (and parallel
//! links in the order given). The result therefore depends on node names and
//! widths only, never on how a caller numbered the nodes.
//!
//! Bidirectional breadth-first search, a whole layer at a time from the end with
//! the smaller frontier. The first layer that reaches nodes labelled from the
//! other end holds, at the same position, a node of every fewest-hop path (a path
//! of L ≤ kf + kb hops has its node kf hops from `src` labelled from both ends),
//! so the best of those nodes gives the route. A failed search stops as soon as
//! either end runs out and returns the *cut*: the links leaving the region
//! reachable from that end (the planner uses it to know when to search again).
//! Scratch space is kept between searches; a search costs the size of the
//! region it explores.

use std::collections::{BTreeMap, BTreeSet};

use crate::ids::KmeId;

/// Marks a node not labelled yet (and bounds node and link counts).
const UNSEEN: u32 = u32::MAX;

/// One direction of the search: breadth-first labels from one end.
struct Side {
    hops: Vec<u32>,
    width: Vec<f64>,
    pred: Vec<u32>,
    touched: Vec<u32>,
    frontier: Vec<u32>,
    next: Vec<u32>,
    /// Labels from the destination: a step u → v is travelled v → u.
    backward: bool,
}

impl Side {
    fn new(n: usize, backward: bool) -> Side {
        Side {
            hops: vec![UNSEEN; n],
            width: vec![0.0; n],
            pred: vec![UNSEEN; n],
            touched: Vec::new(),
            frontier: Vec::new(),
            next: Vec::new(),
            backward,
        }
    }

    fn start(&mut self, at: usize) {
        for &v in &self.touched {
            self.hops[v as usize] = UNSEEN;
        }
        self.touched.clear();
        self.frontier.clear();
        self.hops[at] = 0;
        self.width[at] = f64::INFINITY;
        self.touched.push(at as u32);
        self.frontier.push(at as u32);
    }

    /// Labels the next layer: nodes one hop further over links whose width
    /// is at least `need`, each with the largest smallest width of a
    /// fewest-hop path (final, because the whole previous layer is done).
    fn expand(
        &mut self,
        adj: &[Vec<(u32, u32)>],
        need: f64,
        width: &mut impl FnMut(usize, usize, usize) -> f64,
    ) {
        self.next.clear();
        for &u in &self.frontier {
            let u = u as usize;
            let h = self.hops[u] + 1;
            for &(l, v) in &adj[u] {
                let v = v as usize;
                if self.hops[v] < h {
                    continue;
                }
                let w = if self.backward {
                    width(l as usize, v, u)
                } else {
                    width(l as usize, u, v)
                };
                // A NaN width compares as neither: refused like a narrow one.
                if w.partial_cmp(&need)
                    .is_none_or(|o| o == std::cmp::Ordering::Less)
                {
                    continue;
                }
                let w = w.min(self.width[u]);
                if self.hops[v] == UNSEEN {
                    self.hops[v] = h;
                    self.width[v] = w;
                    self.pred[v] = l;
                    self.touched.push(v as u32);
                    self.next.push(v as u32);
                } else if w > self.width[v] {
                    self.width[v] = w;
                    self.pred[v] = l;
                }
            }
        }
        std::mem::swap(&mut self.frontier, &mut self.next);
    }

    /// The links leaving the labelled nodes (after the search ran out).
    fn cut(&self, adj: &[Vec<(u32, u32)>]) -> Vec<u32> {
        let mut cut = Vec::new();
        for &u in &self.touched {
            for &(l, v) in &adj[u as usize] {
                if self.hops[v as usize] == UNSEEN {
                    cut.push(l);
                }
            }
        }
        cut
    }

    /// Links from `v` back to this side's start, nearest `v` first.
    fn walk(&self, mut v: usize, ends: &[(u32, u32)], out: &mut Vec<u32>) {
        while self.hops[v] != 0 {
            // Invariant: a labelled node other than the start has a pred
            // link, one of whose ends is `v`.
            let l = self.pred[v];
            out.push(l);
            let (a, b) = ends[l as usize];
            v = if a as usize == v { b } else { a } as usize;
        }
    }
}

/// Why a network cannot be routed over.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RoutingError(pub String);

/// A network of `n` named nodes and undirected links, with the search's scratch.
pub struct Router {
    /// (link, other end) per node, sorted by the other end's name, then link.
    adj: Vec<Vec<(u32, u32)>>,
    /// Ends of each link.
    ends: Vec<(u32, u32)>,
    from: Side,
    to: Side,
}

impl Router {
    /// A router over nodes named `names` (distinct) and `links` (pairs of indexes
    /// into `names`, two different nodes each; parallel links allowed).
    pub fn new<S: AsRef<str>>(
        names: &[S],
        links: &[(usize, usize)],
    ) -> Result<Router, RoutingError> {
        let n = names.len();
        if n >= UNSEEN as usize || links.len() >= UNSEEN as usize {
            return Err(RoutingError("too many nodes or links".into()));
        }
        let mut adj = vec![Vec::new(); n];
        for (i, &(a, b)) in links.iter().enumerate() {
            if a >= n || b >= n || a == b {
                return Err(RoutingError(format!(
                    "link {i}: ends must be two different known nodes"
                )));
            }
            adj[a].push((i as u32, b as u32));
            adj[b].push((i as u32, a as u32));
        }
        for list in &mut adj {
            list.sort_by(|x, y| {
                names[x.1 as usize]
                    .as_ref()
                    .cmp(names[y.1 as usize].as_ref())
                    .then(x.0.cmp(&y.0))
            });
        }
        Ok(Router {
            adj,
            ends: links.iter().map(|&(a, b)| (a as u32, b as u32)).collect(),
            from: Side::new(n, false),
            to: Side::new(n, true),
        })
    }

    /// The widest shortest path from `src` to `dst` (see the module doc) over
    /// links whose `width(link, a, b)`, travelled from `a` to `b`, is at least
    /// `need` (a NaN width never is). `Ok(links)` from `src` to `dst` (empty when
    /// `src == dst`), or `Err(cut)`: the links leaving the part of the network
    /// reachable from one end. Node indexes out of range give an empty cut.
    pub fn route(
        &mut self,
        src: usize,
        dst: usize,
        need: f64,
        mut width: impl FnMut(usize, usize, usize) -> f64,
    ) -> Result<Vec<u32>, Vec<u32>> {
        let n = self.adj.len();
        if src >= n || dst >= n {
            return Err(Vec::new());
        }
        if src == dst {
            return Ok(Vec::new());
        }
        self.from.start(src);
        self.to.start(dst);
        loop {
            if self.from.frontier.is_empty() {
                return Err(self.from.cut(&self.adj));
            }
            if self.to.frontier.is_empty() {
                return Err(self.to.cut(&self.adj));
            }
            let forward = self.from.frontier.len() <= self.to.frontier.len();
            let (side, other) = if forward {
                (&mut self.from, &self.to)
            } else {
                (&mut self.to, &self.from)
            };
            side.expand(&self.adj, need, &mut width);
            let mut best: Option<(u32, f64, usize)> = None;
            for &v in &side.frontier {
                let v = v as usize;
                if other.hops[v] == UNSEEN {
                    continue;
                }
                let len = side.hops[v] + other.hops[v];
                let w = side.width[v].min(other.width[v]);
                let better = match best {
                    None => true,
                    Some((bl, bw, _)) => len < bl || (len == bl && w > bw),
                };
                if better {
                    best = Some((len, w, v));
                }
            }
            if let Some((len, _, v)) = best {
                let mut route = Vec::with_capacity(len as usize);
                self.from.walk(v, &self.ends, &mut route);
                route.reverse();
                self.to.walk(v, &self.ends, &mut route);
                return Ok(route);
            }
        }
    }

    /// The nodes a route of links from `src` visits, `src` first.
    pub fn nodes_of(&self, src: usize, route: &[u32]) -> Vec<usize> {
        let mut nodes = Vec::with_capacity(route.len() + 1);
        nodes.push(src);
        let mut at = src;
        for &l in route {
            let (a, b) = self.ends[l as usize];
            at = if a as usize == at { b } else { a } as usize;
            nodes.push(at);
        }
        nodes
    }
}

/// A network of KMEs as an undirected graph (the relay's view).
pub type Graph = BTreeMap<KmeId, BTreeSet<KmeId>>;

/// Adds the undirected link `a–b` to `g`.
pub fn add_link(g: &mut Graph, a: &KmeId, b: &KmeId) {
    if a != b {
        g.entry(a.clone()).or_default().insert(b.clone());
        g.entry(b.clone()).or_default().insert(a.clone());
    }
}

/// [`Router::route`] over a KME graph: the widest shortest path from `from` to
/// `to`, as KMEs (`from` first). `weight(a, b)` is `None` for a link that cannot
/// be used from `a` to `b`, else its capacity. `None` when there is no path or
/// `from == to`.
pub fn kme_route(
    g: &Graph,
    from: &KmeId,
    to: &KmeId,
    mut weight: impl FnMut(&KmeId, &KmeId) -> Option<u64>,
) -> Option<Vec<KmeId>> {
    if from == to {
        return None;
    }
    let names: Vec<&KmeId> = g.keys().collect();
    let index: BTreeMap<&KmeId, usize> = names.iter().enumerate().map(|(i, k)| (*k, i)).collect();
    let links: Vec<(usize, usize)> = g
        .iter()
        .flat_map(|(a, bs)| bs.iter().filter(move |b| a < *b).map(move |b| (a, b)))
        .filter_map(|(a, b)| Some((*index.get(a)?, *index.get(b)?)))
        .collect();
    let (src, dst) = (*index.get(from)?, *index.get(to)?);
    let names_str: Vec<&str> = names.iter().map(|k| k.as_str()).collect();
    let mut router = Router::new(&names_str, &links).ok()?;
    let route = router
        .route(src, dst, 0.0, |_, a, b| {
            weight(names[a], names[b]).map_or(f64::NAN, |u| u as f64)
        })
        .ok()?;
    Some(
        router
            .nodes_of(src, &route)
            .into_iter()
            .map(|i| names[i].clone())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ring of six nodes (every opposite pair has two equal routes) plus a chord.
    fn ring() -> (Vec<&'static str>, Vec<(usize, usize)>) {
        let names = vec!["a", "b", "c", "d", "e", "f"];
        let links = (0..6).map(|i| (i, (i + 1) % 6)).chain([(1, 4)]).collect();
        (names, links)
    }

    #[test]
    fn fewest_hops_then_widest_then_name_order() {
        let (names, links) = ring();
        let mut r = Router::new(&names, &links).expect("valid");
        // a → d: a-b-c-d, a-f-e-d, a-b-e-d: three hops each; all equal width.
        let route = r.route(0, 3, 0.0, |_, _, _| 1.0).expect("route");
        let nodes: Vec<&str> = r.nodes_of(0, &route).iter().map(|&i| names[i]).collect();
        assert_eq!(nodes.len(), 4);
        // Wider through f-e: that one wins.
        let route = r
            .route(
                0,
                3,
                0.0,
                |l, _, _| if links[l] == (0, 1) { 1.0 } else { 2.0 },
            )
            .expect("route");
        let nodes: Vec<&str> = r.nodes_of(0, &route).iter().map(|&i| names[i]).collect();
        assert_eq!(nodes, ["a", "f", "e", "d"]);
        // Links below `need` are not used; none left gives the cut around `a`.
        let cut = r
            .route(0, 3, 5.0, |l, _, _| if l == 0 { 9.0 } else { 1.0 })
            .expect_err("no route");
        assert!(!cut.is_empty());
        assert!(r.route(0, 0, 0.0, |_, _, _| 1.0).expect("self").is_empty());
        assert!(r.route(0, 9, 0.0, |_, _, _| 1.0).is_err());
    }

    #[test]
    fn direction_of_travel_reaches_the_width_function() {
        let names = ["a", "b", "c"];
        let links = [(0, 1), (1, 2)];
        let mut r = Router::new(&names, &links).expect("valid");
        // Usable only from a towards c.
        let w = |_: usize, a: usize, b: usize| if a < b { 1.0 } else { f64::NAN };
        assert!(r.route(0, 2, 0.0, w).is_ok());
        assert!(r.route(2, 0, 0.0, w).is_err());
    }

    #[test]
    fn numbering_does_not_change_the_route() {
        // The same ring with nodes listed in reverse: same route by name.
        let (names, links) = ring();
        let rev: Vec<&str> = names.iter().rev().copied().collect();
        let map = |i: usize| 5 - i;
        let rlinks: Vec<(usize, usize)> = links.iter().map(|&(a, b)| (map(a), map(b))).collect();
        let mut r1 = Router::new(&names, &links).expect("valid");
        let mut r2 = Router::new(&rev, &rlinks).expect("valid");
        for s in 0..6 {
            for d in 0..6 {
                let p1 = r1.route(s, d, 0.0, |_, _, _| 1.0).expect("route");
                let p2 = r2.route(map(s), map(d), 0.0, |_, _, _| 1.0).expect("route");
                let n1: Vec<&str> = r1.nodes_of(s, &p1).iter().map(|&i| names[i]).collect();
                let n2: Vec<&str> = r2.nodes_of(map(s), &p2).iter().map(|&i| rev[i]).collect();
                assert_eq!(n1, n2, "{s} → {d}");
            }
        }
    }

    #[test]
    fn bad_links_are_refused() {
        assert!(Router::new(&["a"], &[(0, 0)]).is_err());
        assert!(Router::new(&["a", "b"], &[(0, 2)]).is_err());
    }
}
