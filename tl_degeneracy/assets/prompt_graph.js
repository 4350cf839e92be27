/* Prompt-graph viewer of tl_degeneracy (drawn with d3 v7, vendored as window.tldD3).
 *
 * tldPromptGraph.render(id, data, opts) draws PromptGraph.to_viewer_data() into the element with
 * that id: one row per site that has kept nodes (embeddings at the bottom, the target at the
 * top), one column per position with the prompt's tokens along the bottom, the nodes of a
 * (site, position) cell side by side by decreasing influence. Node size follows influence and
 * colour the sign of the attribution to the target (blue supports it, red opposes it); edge
 * width follows |weight|, colour its sign. Hover shows values; a click opens the node in the
 * side panel (contexts, logit effects, strongest connections) with Pin and Hide; shift-click
 * pins. All data strings go through d3's text() or attr(), never its HTML setter.
 */
(function () {
  "use strict";

  var ROW = 24, COL_MIN = 50, GAP = 12, LEFT = 120, TOP = 16, BOTTOM = 56;
  var POS = "#2b6cb0", NEG = "#c53030";

  function fmt(v) {
    if (v === null || v === undefined || !isFinite(v)) return String(v);
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e4)) return v.toExponential(2);
    return v.toPrecision(3).replace(/\.?0+$/, "");
  }

  function truncate(s, n) {
    s = String(s);
    return s.length > n ? s.slice(0, n - 1) + "\u2026" : s;
  }

  // as feature_views.visible_token: newlines ↵, tabs →, a token of spaces only as ␣ per space
  function visible(tok) {
    var t = String(tok).replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192");
    return t && !/[^ ]/.test(t) ? "\u2423".repeat(t.length) : t;
  }

  function render(id, data, opts) {
    var d3 = window.tldD3;
    opts = opts || {};
    var root = d3.select(document.getElementById(id));
    root.selectAll("*").remove();
    var tokens = data.tokens || [];
    var sites = data.sites || [];
    var details = data.details || {};
    var nodes = (data.nodes || []).map(function (n) {
      return Object.assign({}, n, { inc: [], out: [] });
    });
    var byId = new Map(nodes.map(function (n) { return [n.id, n]; }));
    var edges = (data.edges || []).filter(function (e) {
      return byId.has(e.source) && byId.has(e.target);
    }).map(function (e) {
      var edge = { source: byId.get(e.source), target: byId.get(e.target), weight: +e.weight };
      edge.source.out.push(edge);
      edge.target.inc.push(edge);
      return edge;
    });

    // Rows (layers with kept nodes) and columns (positions, wide enough for the shown part of
    // their cells: the `perCell` nodes of largest influence of each site and position).
    var layers = Array.from(new Set(nodes.map(function (n) { return n.layer; })))
      .sort(d3.ascending);
    var rowOf = new Map(layers.map(function (l, i) { return [l, i]; }));
    var cells = d3.group(nodes, function (n) { return n.layer + ":" + n.pos; });
    var biggest = 1;
    cells.forEach(function (list) {
      list.sort(function (a, b) { return b.influence - a.influence; });
      list.forEach(function (n, i) { n.slot = i; n.cellSize = list.length; });
      biggest = Math.max(biggest, list.length);
    });
    var colW = [], colX = [], acc = LEFT, width = 0;
    var height = TOP + layers.length * ROW + BOTTOM;
    function place(perCell) {
      var perPos = tokens.map(function () { return 1; });
      cells.forEach(function (list) {
        var p = list[0].pos;
        perPos[p] = Math.max(perPos[p] || 1, Math.min(list.length, perCell));
      });
      colW = perPos.map(function (k) { return Math.max(COL_MIN, k * GAP + 16); });
      colX = [];
      acc = LEFT;
      colW.forEach(function (w) { colX.push(acc); acc += w; });
      width = Math.max(acc + 20, opts.width || 0);
    }
    var nx = function (n) {
      var k = Math.min(n.cellSize, state.perCell);
      return colX[n.pos] + colW[n.pos] / 2 + (Math.min(n.slot, k - 1) - (k - 1) / 2) * GAP;
    };
    var ny = function (n) { return TOP + (layers.length - 1 - rowOf.get(n.layer)) * ROW + ROW / 2; };
    var rowName = function (l) {
      return l < 0 ? "embeddings" : l >= sites.length ? "target" : sites[l];
    };
    var shortName = function (l) {  // blocks.12.hook_resid_pre -> 12 resid_pre
      return rowName(l).replace(/^blocks\.(\d+)\.hook_/, "$1 ").replace(/^blocks\.(\d+)\./, "$1 ");
    };

    var state = {
      hidden: new Set(), pinned: new Set(), rest: true, edgeShare: 1,
      perCell: Math.min(opts.perCell || 8, biggest)
    };
    place(state.perCell);
    var maxInf = d3.max(nodes, function (n) { return n.kind === "target" ? 0 : n.influence; }) || 1;
    var radius = d3.scaleSqrt().domain([0, maxInf]).range([2.5, 8]).clamp(true);
    var maxAttr = d3.max(nodes, function (n) {
      return n.kind === "target" ? 0 : Math.abs(n.attribution);
    }) || 1;
    var maxW = d3.max(edges, function (e) { return Math.abs(e.weight); }) || 1;
    var strokeW = d3.scaleSqrt().domain([0, maxW]).range([0.3, 5]).clamp(true);
    var sortedW = edges.map(function (e) { return Math.abs(e.weight); }).sort(d3.descending);


    var wrap = root.append("div").attr("class", "tld-pg-wrap");
    var main = wrap.append("div").attr("class", "tld-pg-main");
    var bar = main.append("div").attr("class", "tld-pg-bar");
    var restBox = bar.append("label");
    restBox.append("input").attr("type", "checkbox").property("checked", true)
      .attr("class", "tld-pg-rest-toggle")
      .on("change", function () { state.rest = this.checked; update(); });
    restBox.append("span").text(" rest nodes");
    var slider = bar.append("label");
    slider.append("span").text(" strongest edges ");
    slider.append("input").attr("type", "range").attr("min", 1).attr("max", 100).attr("value", 100)
      .attr("class", "tld-pg-edge-slider")
      .on("input", function () { state.edgeShare = this.value / 100; update(); });
    var cellBox = bar.append("label");
    cellBox.append("span").text(" nodes per cell ");
    cellBox.append("input").attr("type", "number").attr("min", 1).attr("max", biggest)
      .attr("value", state.perCell).attr("class", "tld-pg-per-cell")
      .on("change", function () {
        state.perCell = Math.max(1, Math.min(biggest, +this.value || 1));
        relayout();
      });
    var unpin = bar.append("button").attr("type", "button").attr("class", "tld-pg-unpin")
      .text("unpin all").on("click", function () { state.pinned.clear(); update(); });
    var unhide = bar.append("button").attr("type", "button").attr("class", "tld-pg-unhide")
      .on("click", function () { state.hidden.clear(); update(); });
    var note = bar.append("span").attr("class", "tld-pg-note");

    var scroller = main.append("div").attr("class", "tld-pg-scroll");
    var svg = scroller.append("svg").attr("class", "tld-pg-svg")
      .attr("width", width).attr("height", height)
      .attr("viewBox", [0, 0, width, height].join(" "))
      .attr("role", "img").attr("aria-label", "prompt graph");
    var tooltip = window.tldTooltip(main);
    var panel = wrap.append("div").attr("class", "tld-panel tld-pg-panel");
    var hint = function () {
      panel.selectAll("*").remove();
      panel.attr("data-selected", null);
      panel.append("div").attr("class", "tld-panel-hint")
        .text("Click a node for its values, contexts and logit effects; shift-click pins it.");
    };
    hint();

    // Grid: row labels on the left, token labels along the bottom, light guides.
    var grid = svg.append("g").attr("class", "tld-pg-grid");
    var rowLines = grid.selectAll("line.tld-pg-row").data(layers).join("line")
      .attr("class", "tld-pg-row")
      .attr("x1", LEFT).attr("x2", acc)
      .attr("y1", function (l) { return ny({ layer: l }); })
      .attr("y2", function (l) { return ny({ layer: l }); });
    grid.selectAll("text.tld-pg-row-label").data(layers).join("text")
      .attr("class", "tld-pg-row-label").attr("x", LEFT - 8)
      .attr("y", function (l) { return ny({ layer: l }); }).attr("dy", "0.35em")
      .attr("text-anchor", "end")
      .text(function (l) { return truncate(shortName(l), 18); })
      .append("title").text(function (l) { return rowName(l); });
    var tokY = TOP + layers.length * ROW + 14;
    var tokenPlace = function (_, i) {
      return "translate(" + (colX[i] + colW[i] / 2) + "," + tokY + ") rotate(-30)";
    };
    var tokenSel = grid.selectAll("text.tld-pg-token").data(tokens).join("text")
      .attr("class", "tld-pg-token")
      .attr("transform", tokenPlace)
      .attr("text-anchor", "end")
      .text(function (t) { return truncate(visible(t), 12); })
      .append("title").text(function (t, i) { return i + ": " + JSON.stringify(String(t)); });

    var edgePath = function (e) {
      var x1 = nx(e.source), y1 = ny(e.source), x2 = nx(e.target), y2 = ny(e.target);
      var ym = (y1 + y2) / 2;
      return "M" + x1 + "," + y1 + "C" + x1 + "," + ym + " " + x2 + "," + ym + " " + x2 + "," + y2;
    };
    var edgeSel = svg.append("g").attr("class", "tld-pg-edges").selectAll("path")
      .data(edges.slice().sort(function (a, b) { return Math.abs(a.weight) - Math.abs(b.weight); }))
      .join("path")
      .attr("class", "tld-pg-edge")
      .attr("d", edgePath)
      .attr("stroke", function (e) { return e.weight >= 0 ? POS : NEG; })
      .attr("stroke-width", function (e) { return strokeW(Math.abs(e.weight)); })
      .attr("data-source", function (e) { return e.source.id; })
      .attr("data-target", function (e) { return e.target.id; })
      .attr("data-weight", function (e) { return e.weight; });

    var nodeSel = svg.append("g").attr("class", "tld-pg-nodes").selectAll("g").data(nodes)
      .join("g")
      .attr("class", function (n) { return "tld-pg-node tld-pg-" + n.kind; })
      .attr("data-id", function (n) { return n.id; })
      .attr("data-kind", function (n) { return n.kind; })
      .attr("tabindex", 0).attr("role", "button")
      .attr("aria-label", function (n) { return rowName(n.layer) + " " + n.label; })
      .attr("transform", function (n) { return "translate(" + nx(n) + "," + ny(n) + ")"; });
    var fill = function (n) {
      if (n.kind === "rest" || n.kind === "embedding") return "#9e9e9e";
      if (n.kind === "target") return "#111";
      return n.attribution >= 0 ? POS : NEG;
    };
    var opacity = function (n) {
      if (n.kind !== "feature") return 1;
      return 0.35 + 0.65 * Math.min(1, Math.abs(n.attribution) / maxAttr);
    };
    nodeSel.filter(function (n) { return n.kind === "feature" || n.kind === "target"; })
      .append("circle")
      .attr("r", function (n) { return n.kind === "target" ? 8 : radius(n.influence); })
      .attr("fill", fill).attr("fill-opacity", opacity);
    nodeSel.filter(function (n) { return n.kind === "rest" || n.kind === "embedding"; })
      .append("rect")
      .attr("x", function (n) { return -radius(n.influence); })
      .attr("y", function (n) { return -radius(n.influence); })
      .attr("width", function (n) { return 2 * radius(n.influence); })
      .attr("height", function (n) { return 2 * radius(n.influence); })
      .attr("rx", function (n) { return n.kind === "embedding" ? 3 : 0; })
      .attr("fill", fill);

    function facts(n) {
      var rows = [["kind", n.kind], ["site", rowName(n.layer)],
        ["position", n.pos + " " + JSON.stringify(String(tokens[n.pos]))]];
      if (n.kind === "feature") rows.push(["feature", String(n.feature)]);
      rows.push([n.kind === "target" ? "value" : "activation", fmt(n.activation)]);
      if (n.kind !== "target") {
        rows.push(["attribution", fmt(n.attribution)]);
        rows.push(["influence", fmt(n.influence)]);
      }
      return rows;
    }

    function isShown(n) {
      return !state.hidden.has(n.id) && (state.rest || n.kind !== "rest") &&
        n.slot < state.perCell;
    }
    function relayout() {
      place(state.perCell);
      svg.attr("width", width).attr("viewBox", [0, 0, width, height].join(" "));
      rowLines.attr("x2", acc);
      tokenSel.attr("transform", tokenPlace);
      nodeSel.attr("transform", function (n) { return "translate(" + nx(n) + "," + ny(n) + ")"; });
      edgeSel.attr("d", edgePath);
      update();
    }
    function update() {
      var cut = sortedW.length
        ? sortedW[Math.max(0, Math.ceil(state.edgeShare * sortedW.length) - 1)] : 0;
      var linked = new Set();
      state.pinned.forEach(function (id) {
        var n = byId.get(id);
        linked.add(id);
        n.inc.forEach(function (e) { linked.add(e.source.id); });
        n.out.forEach(function (e) { linked.add(e.target.id); });
      });
      var anyPinned = state.pinned.size > 0;
      nodeSel.style("display", function (n) { return isShown(n) ? null : "none"; })
        .classed("tld-pg-pinned", function (n) { return state.pinned.has(n.id); })
        .classed("tld-pg-dim", function (n) { return anyPinned && !linked.has(n.id); });
      edgeSel.style("display", function (e) {
        var ok = isShown(e.source) && isShown(e.target) && Math.abs(e.weight) >= cut;
        return ok ? null : "none";
      }).classed("tld-pg-strong", function (e) {
        return state.pinned.has(e.source.id) || state.pinned.has(e.target.id);
      }).classed("tld-pg-dim", function (e) {
        return anyPinned && !(state.pinned.has(e.source.id) || state.pinned.has(e.target.id));
      });
      unhide.text("show hidden (" + state.hidden.size + ")")
        .property("disabled", state.hidden.size === 0);
      unpin.property("disabled", !anyPinned);
      var shownEdges = edgeSel.filter(function () { return this.style.display !== "none"; }).size();
      note.text(" " + nodes.filter(isShown).length + " nodes, " + shownEdges + " edges");
      root.attr("data-hidden", state.hidden.size).attr("data-pinned", state.pinned.size)
        .attr("data-shown", nodes.filter(isShown).length);
    }

    function togglePin(n) {
      if (state.pinned.has(n.id)) state.pinned.delete(n.id); else state.pinned.add(n.id);
      update();
    }

    function connections(title, list, other) {
      if (!list.length) return;
      panel.append("div").attr("class", "tld-panel-h").text(title);
      var ul = panel.append("ul").attr("class", "tld-conn");
      list.slice().sort(function (a, b) { return Math.abs(b.weight) - Math.abs(a.weight); })
        .slice(0, 8).forEach(function (e) {
          var m = other(e);
          var li = ul.append("li");
          li.append("span").text(rowName(m.layer) + " @" + m.pos + " " + m.label);
          li.append("span").attr("class", "tld-val").text(" " + fmt(e.weight));
        });
    }

    function tokenLine(container, ex) {
      var vals = ex.values || [];
      var maxAbs = d3.max(vals, function (v) { return Math.abs(v); }) || 1;
      var line = container.append("div").attr("class", "tld-example tld-example-tokens");
      (ex.tokens || []).forEach(function (tok, i) {
        var missing = vals[i] === null;  // NaN or infinite: not a value, left uncoloured
        var v = missing ? 0 : vals[i] || 0;
        var a = Math.min(1, Math.abs(v) / maxAbs);
        var bg = v >= 0 ? "rgba(43,108,176," + a.toFixed(3) + ")" : "rgba(197,48,48," + a.toFixed(3) + ")";
        line.append("span").attr("class", "tld-ex-tok" + (missing ? " tld-ex-missing" : ""))
          .style("background", bg).attr("title", missing ? "NaN (missing)" : fmt(v)).text(visible(tok));
      });
    }

    function logitList(title, pairs) {
      if (!pairs || !pairs.length) return;
      panel.append("div").attr("class", "tld-panel-h").text(title);
      var div = panel.append("div").attr("class", "tld-pg-logits");
      pairs.forEach(function (p) {
        var item = div.append("span").attr("class", "tld-pg-logit");
        item.append("span").attr("class", "tld-tok").attr("title", String(p[0])).text(visible(p[0]));
        item.append("span").attr("class", "tld-val").text(fmt(p[1]));
      });
    }

    function select(n) {
      nodeSel.classed("tld-selected", function (m) { return m === n; });
      panel.selectAll("*").remove();
      panel.attr("data-selected", n.id);
      panel.append("div").attr("class", "tld-panel-title")
        .text(n.kind === "feature" ? "feature " + n.feature : n.label);
      var dl = panel.append("dl").attr("class", "tld-panel-facts");
      facts(n).forEach(function (kv) { dl.append("dt").text(kv[0]); dl.append("dd").text(kv[1]); });
      var buttons = panel.append("div").attr("class", "tld-pg-buttons");
      buttons.append("button").attr("type", "button").attr("class", "tld-pg-pin")
        .text(state.pinned.has(n.id) ? "unpin" : "pin")
        .on("click", function () { togglePin(n); select(n); });
      buttons.append("button").attr("type", "button").attr("class", "tld-pg-hide")
        .text("hide").on("click", function () {
          state.hidden.add(n.id); state.pinned.delete(n.id); update(); hint();
        });
      connections("Strongest inputs", n.inc, function (e) { return e.source; });
      connections("Strongest outputs", n.out, function (e) { return e.target; });
      var d = n.details ? details[n.details] : null;
      if (n.kind === "feature") {
        panel.append("div").attr("class", "tld-panel-h").text("Top-activating contexts");
        var list = panel.append("div").attr("class", "tld-examples");
        var examples = (d && d.examples) || [];
        if (!examples.length) {
          list.append("div").attr("class", "tld-panel-hint").text("No contexts were given.");
        }
        examples.forEach(function (ex) {
          if (typeof ex === "string") list.append("div").attr("class", "tld-example").text(ex);
          else tokenLine(list, ex);
        });
        logitList("Promotes", d && d.promoted);
        logitList("Suppresses", d && d.suppressed);
      }
    }

    nodeSel
      .on("mouseenter", function (event, n) { tooltip.show(event, facts(n)); })
      .on("mousemove", tooltip.move)
      .on("mouseleave", tooltip.hide)
      .on("click", function (event, n) {
        if (event.shiftKey) togglePin(n); else select(n);
      })
      .on("keydown", function (event, n) {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); select(n); }
        if (event.key === "p") togglePin(n);
      });
    edgeSel
      .on("mouseenter", function (event, e) {
        tooltip.show(event, [
          ["from", rowName(e.source.layer) + " @" + e.source.pos + " " + e.source.label],
          ["to", rowName(e.target.layer) + " @" + e.target.pos + " " + e.target.label],
          ["weight", fmt(e.weight)]
        ]);
      })
      .on("mouseleave", tooltip.hide);
    svg.on("click", function (event) {
      if (event.target === this) { nodeSel.classed("tld-selected", false); hint(); }
    });

    main.append("div").attr("class", "tld-legend").append("span").attr("class", "tld-legend-note")
      .text("target " + (data.target ? data.target.name + " = " + fmt(data.target.value) : "") +
        (data.basis ? "; " + data.basis + " basis" : "") +
        "; node size \u221d \u221ainfluence; blue supports the target, red opposes it; " +
        "each cell shows its most influential nodes (\"nodes per cell\"); " +
        "squares: rest nodes (mean + truncated directions) and embeddings");
    update();
    root.attr("data-rendered", "true");
  }

  window.tldPromptGraph = { render: render };
})();
