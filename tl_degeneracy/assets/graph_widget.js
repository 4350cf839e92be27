/* Interaction-graph widget of tl_degeneracy (drawn with d3 v7, vendored as window.tldD3).
 *
 * tldGraph.render(id, data, opts) draws the graph prepared by
 * tl_degeneracy.viz.graph_widget (layers of features; edges as
 * [source index, target index, weight, cum], cum the share of the target's input carried by
 * its stronger inputs) into the element with that id:
 * one column per site, the top features of each site as nodes (coloured by module when there
 * are modules), and for each feature the strongest inputs that carry a chosen share of its
 * input, with width proportional to |weight| within the section. Controls set the number of
 * features per site, that share and the block range; a click on a feature shows its inputs,
 * outputs, top-activating examples and logit effects in the side panel.
 * All data strings go through d3's text() or attr() (never its HTML setter), so labels cannot
 * inject markup.
 */
(function () {
  "use strict";

  var ROW = 24, TOP = 46, BOTTOM = 14, LEFT = 14, GAP = 64, MAX_WIDTH = 8;

  function fmt(v) {
    if (v === null || v === undefined || !isFinite(v)) return String(v);
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e4)) return v.toExponential(2);
    return v.toPrecision(3).replace(/\.?0+$/, "");
  }
  function pct(v) { return (100 * v).toFixed(v < 0.1 ? 1 : 0) + "%"; }
  function truncate(s, n) { s = String(s); return s.length > n ? s.slice(0, n - 1) + "\u2026" : s; }
  // as feature_views.visible_token: newlines ↵, tabs →, a token of spaces only as ␣ per space
  function visible(tok) {
    var t = String(tok).replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192");
    return t && !/[^ ]/.test(t) ? "\u2423".repeat(t.length) : t;
  }
  function hasModule(n) { return n.module !== null && n.module !== undefined; }

  function render(id, data, opts) {
    var d3 = window.tldD3;
    opts = opts || {};
    var labelChars = opts.labelChars || 18;
    var maxShare = opts.maxShare || 0.99;
    var root = d3.select(document.getElementById(id));
    root.selectAll("*").remove();

    var layers = data.layers || [];
    var nodes = [];
    var byId = new Map();
    layers.forEach(function (layer, li) {
      layer.features.forEach(function (f, fi) {
        var n = Object.assign({}, f, {
          site: layer.site, siteLabel: layer.label, block: layer.block, layer: li, row: fi,
          out: [], inc: []
        });
        nodes.push(n);
        byId.set(n.id, n);
      });
    });
    var edges = (data.edges || []).filter(function (e) {
      return nodes[e[0]] && nodes[e[1]];
    }).map(function (e) {
      var t = nodes[e[1]];
      var total = t.input_total || Math.abs(e[2]) || 1;
      var edge = { source: nodes[e[0]], target: t, weight: e[2], share: Math.abs(e[2]) / total, cum: e[3] };
      edge.source.out.push(edge);
      edge.target.inc.push(edge);
      return edge;
    });
    nodes.forEach(function (n) {
      var by = function (a, b) { return Math.abs(b.weight) - Math.abs(a.weight); };
      n.inc.sort(by);
      n.out.sort(by);
    });
    var sectionMax = new Map();
    edges.forEach(function (e) {
      var k = e.source.layer;
      sectionMax.set(k, Math.max(sectionMax.get(k) || 0, Math.abs(e.weight)));
    });
    var layerMax = layers.map(function (l) {
      return d3.max(l.features, function (f) { return Math.abs(f.importance); }) || 1;
    });
    var maxFeatures = d3.max(layers, function (l) { return l.features.length; }) || 1;
    var blocks = Array.from(new Set(layers.map(function (l) { return l.block; }))).sort(d3.ascending);
    var signed = edges.some(function (e) { return e.weight < 0; });
    var modules = Array.from(new Set(nodes.filter(hasModule).map(function (n) { return n.module; })))
      .sort(d3.ascending);
    var colour = d3.scaleOrdinal().domain(modules).range(d3.schemeTableau10);
    var fill = function (n) { return hasModule(n) ? colour(n.module) : "#7f8c9d"; };

    var range = opts.blocks || [blocks[0], blocks[blocks.length - 1]];
    var state = {
      features: Math.max(1, Math.min(opts.features || 12, maxFeatures)),
      share: Math.min(opts.share || 0.8, maxShare),
      lo: range[0], hi: range[1], selected: null
    };

    // Controls: features per site, share of each feature's input, block range.
    var controls = root.append("div").attr("class", "tld-controls");
    var fc = controls.append("label").attr("class", "tld-ctl");
    fc.append("span").text("features per site ");
    var fIn = fc.append("input").attr("type", "number").attr("class", "tld-ctl-features")
      .attr("min", 1).attr("max", maxFeatures).property("value", state.features);
    var sc = controls.append("label").attr("class", "tld-ctl");
    sc.append("span").text("edges carrying ");
    var sIn = sc.append("input").attr("type", "range").attr("class", "tld-ctl-share")
      .attr("min", 5).attr("max", Math.round(100 * maxShare)).attr("step", 1)
      .property("value", Math.round(100 * state.share));
    var sOut = sc.append("span").attr("class", "tld-ctl-value");
    sc.append("span").text(" of each feature's input");
    var loIn = null, hiIn = null;
    if (blocks.length > 1) {
      var bc = controls.append("label").attr("class", "tld-ctl");
      bc.append("span").text("blocks ");
      loIn = bc.append("select").attr("class", "tld-ctl-block-lo");
      bc.append("span").text(" to ");
      hiIn = bc.append("select").attr("class", "tld-ctl-block-hi");
      [loIn, hiIn].forEach(function (sel, i) {
        sel.selectAll("option").data(blocks).join("option")
          .attr("value", function (b) { return b; }).text(function (b) { return b; });
        sel.property("value", i === 0 ? state.lo : state.hi);
      });
    }
    var status = controls.append("span").attr("class", "tld-ctl-status");

    var wrap = root.append("div").attr("class", "tld-graph-wrap");
    var main = wrap.append("div").attr("class", "tld-graph-main");
    var scroller = main.append("div").attr("class", "tld-graph-scroll");
    var svg = scroller.append("svg").attr("class", "tld-graph-svg")
      .attr("role", "img").attr("aria-label", "interaction graph");
    var tooltip = window.tldTooltip(main);
    var legend = main.append("div").attr("class", "tld-legend");
    var panel = wrap.append("div").attr("class", "tld-panel");

    var nodeSel = d3.select(null), edgeSel = d3.select(null);

    function draw() {
      svg.selectAll("*").remove();
      tooltip.hide();
      var cols = [];
      layers.forEach(function (l, i) { if (l.block >= state.lo && l.block <= state.hi) cols.push(i); });
      var colOf = new Map(cols.map(function (li, c) { return [li, c]; }));
      var shown = nodes.filter(function (n) { return colOf.has(n.layer) && n.row < state.features; });
      var isShown = new Set(shown);
      var shownEdges = edges.filter(function (e) {
        return isShown.has(e.source) && isShown.has(e.target) && e.cum < state.share - 1e-9;
      }).sort(function (a, b) { return Math.abs(a.weight) - Math.abs(b.weight); });

      var rows = d3.max(cols, function (li) { return Math.min(layers[li].features.length, state.features); }) || 1;
      var height = TOP + rows * ROW + BOTTOM;
      var yOf = function (n) { return TOP + n.row * ROW + ROW / 2; };
      var radius = function (n) { return 3 + 6 * Math.sqrt(Math.abs(n.importance) / layerMax[n.layer]); };

      // Nodes and labels first: columns are as wide as their longest label plus room for edges.
      var gHeads = svg.append("g").attr("class", "tld-sites");
      var gEdges = svg.append("g").attr("class", "tld-edges");
      nodeSel = svg.append("g").attr("class", "tld-nodes").selectAll("g").data(shown).join("g")
        .attr("class", "tld-node")
        .attr("data-id", function (n) { return n.id; })
        .attr("data-site", function (n) { return n.site; })
        .attr("data-module", function (n) { return hasModule(n) ? n.module : ""; })
        .attr("tabindex", 0).attr("role", "button")
        .attr("aria-label", function (n) { return n.site + " " + n.label; })
        .classed("tld-selected", function (n) { return n === state.selected; });
      nodeSel.append("circle").attr("r", radius).attr("fill", fill);
      nodeSel.append("text").attr("class", "tld-node-label").attr("x", 11).attr("dy", "0.35em")
        .text(function (n) { return truncate(n.label, labelChars); });
      var colW = cols.map(function () { return 24; });
      nodeSel.each(function (n) {
        var label = this.querySelector("text");
        var w = label.getComputedTextLength ? label.getComputedTextLength() : 0;
        n.labelWidth = w || label.textContent.length * 6.5;
        var c = colOf.get(n.layer);
        colW[c] = Math.max(colW[c], n.labelWidth);
      });
      var colX = [], x = LEFT + 10;
      cols.forEach(function (li, c) { colX.push(x); x += 11 + colW[c] + GAP; });
      var width = Math.max(200, x - GAP + 24);
      svg.attr("width", width).attr("height", height).attr("viewBox", [0, 0, width, height].join(" "));
      var xOf = function (li) { return colX[colOf.get(li)]; };
      var outX = function (li) { return xOf(li) + 11 + colW[colOf.get(li)] + 6; };
      nodeSel.attr("transform", function (n) { return "translate(" + xOf(n.layer) + "," + yOf(n) + ")"; });

      var heads = gHeads.selectAll("g").data(cols).join("g")
        .attr("transform", function (li) { return "translate(" + (xOf(li) - 8) + ",0)"; });
      heads.append("text").attr("class", "tld-site-label").attr("y", 16)
        .text(function (li, c) {
          return truncate(layers[li].label, Math.max(6, Math.floor((colW[c] + GAP) / 7)));
        })
        .append("title").text(function (li) { return layers[li].site; });
      heads.append("text").attr("class", "tld-site-sub").attr("y", 32)
        .text(function (li) { return layers[li].features.length ? "" : "no features"; });
      nodeSel.filter(function (n) { return n.out.some(function (e) { return isShown.has(e.target); }); })
        .insert("line", ":first-child").attr("class", "tld-guide")
        .attr("x1", function (n) { return 11 + n.labelWidth + 2; }).attr("y1", 0).attr("y2", 0)
        .attr("x2", function (n) { return outX(n.layer) - xOf(n.layer); });

      edgeSel = gEdges.selectAll("path").data(shownEdges).join("path")
        .attr("class", function (e) { return "tld-edge" + (e.weight < 0 ? " tld-edge-neg" : ""); })
        .attr("data-source", function (e) { return e.source.id; })
        .attr("data-target", function (e) { return e.target.id; })
        .attr("data-weight", function (e) { return e.weight; })
        .attr("stroke-width", function (e) {
          return Math.max(0.35, MAX_WIDTH * Math.abs(e.weight) / (sectionMax.get(e.source.layer) || 1));
        })
        .attr("d", function (e) {
          var x0 = outX(e.source.layer), y0 = yOf(e.source);
          var x1 = xOf(e.target.layer) - radius(e.target) - 1, y1 = yOf(e.target);
          if (x1 <= x0) {
            var bend = x0 + 40 + Math.abs(y1 - y0) / 4;
            return "M" + x0 + "," + y0 + "C" + bend + "," + y0 + " " + bend + "," + y1 + " " + x1 + "," + y1;
          }
          var xm = (x0 + x1) / 2;
          return "M" + x0 + "," + y0 + "C" + xm + "," + y0 + " " + xm + "," + y1 + " " + x1 + "," + y1;
        });

      nodeSel
        .on("mouseenter", function (event, n) {
          focus(n);
          var rows = [["site", n.site], ["feature", n.label], ["importance", fmt(n.importance)]];
          if (hasModule(n)) rows.push(["module", String(n.module)]);
          var inShown = n.inc.filter(function (e) { return e.cum < state.share - 1e-9; });
          if (n.inc.length) {
            var carried = d3.sum(inShown, function (e) { return e.share; });
            rows.push(["inputs drawn", inShown.length + " (" + pct(carried) + " of its input)"]);
          }
          tooltip.show(event, rows);
        })
        .on("mousemove", tooltip.move)
        .on("mouseleave", function () { unfocus(); tooltip.hide(); })
        .on("click", function (event, n) { select(n); })
        .on("keydown", function (event, n) {
          if (event.key === "Enter" || event.key === " ") { event.preventDefault(); select(n); }
        });
      edgeSel
        .on("mouseenter", function (event, e) {
          d3.select(this).classed("tld-hover", true);
          tooltip.show(event, [
            ["from", e.source.siteLabel + " / " + e.source.label],
            ["to", e.target.siteLabel + " / " + e.target.label],
            ["weight", fmt(e.weight)],
            ["share of the target's input", pct(e.share)]
          ]);
        })
        .on("mouseleave", function () { d3.select(this).classed("tld-hover", false); tooltip.hide(); });
      svg.on("click", function (event) { if (event.target === this) select(null); });

      sOut.text(Math.round(100 * state.share) + "%");
      status.text(cols.length + " of " + layers.length + " sites, " + shown.length + " features, " +
        shownEdges.length + " edges");
      root.attr("data-nodes", shown.length).attr("data-edges", shownEdges.length)
        .attr("data-columns", cols.length);
    }

    function drawLegend() {
      legend.selectAll("*").remove();
      modules.forEach(function (m) {
        var item = legend.append("span").attr("class", "tld-legend-item");
        item.append("span").attr("class", "tld-swatch").style("background", colour(m));
        item.append("span").text("module " + m);
      });
      var rule = "node size \u221d \u221aimportance within its site; edge width \u221d |weight| " +
        "within its section (the widest edge is the section's largest)";
      if (signed) rule += "; grey: positive, red: negative";
      if (opts.maxInputs) rule += "; at most " + opts.maxInputs + " inputs stored per feature";
      legend.append("span").attr("class", "tld-legend-note").text(rule);
    }

    function focus(n) {
      var linked = new Set([n.id]);
      n.out.forEach(function (e) { linked.add(e.target.id); });
      n.inc.forEach(function (e) { linked.add(e.source.id); });
      svg.classed("tld-focus", true);
      nodeSel.classed("tld-linked", function (m) { return linked.has(m.id); });
      edgeSel.classed("tld-linked", function (e) { return e.source === n || e.target === n; });
    }
    function unfocus() {
      svg.classed("tld-focus", false);
      nodeSel.classed("tld-linked", false);
      edgeSel.classed("tld-linked", false);
    }

    function tokenExample(container, ex) {
      var vals = ex.values || [];
      var maxAbs = d3.max(vals, function (v) { return Math.abs(v); }) || 1;
      var line = container.append("div").attr("class", "tld-example tld-example-tokens");
      (ex.tokens || []).forEach(function (tok, i) {
        var missing = vals[i] === null;  // NaN or infinite: not a value, left uncoloured
        var v = missing ? 0 : vals[i] || 0;
        var a = Math.min(1, Math.abs(v) / maxAbs);
        var bg = v >= 0 ? "rgba(230, 85, 13," + a.toFixed(3) + ")" : "rgba(49, 130, 189," + a.toFixed(3) + ")";
        line.append("span").attr("class", "tld-ex-tok" + (i === ex.center ? " tld-ex-peak" : "") + (missing ? " tld-ex-missing" : ""))
          .style("background", bg).attr("title", missing ? "NaN (missing)" : fmt(v)).text(visible(tok));
      });
    }

    function connection(list, e, other, value) {
      var li = list.append("li").attr("class", "tld-conn-item");
      li.append("span").attr("class", "tld-conn-link").attr("role", "button")
        .text(other.siteLabel + " / " + truncate(other.label, 40))
        .on("click", function () { select(other); });
      li.append("span").attr("class", "tld-val").text(" " + fmt(e.weight) + " (" + value + ")");
    }

    function chips(container, title, items, cls) {
      if (!items || !items.length) return;
      var row = container.append("div").attr("class", "tld-logit-row");
      row.append("span").attr("class", "tld-logit-h").text(title + " ");
      items.forEach(function (it) {
        row.append("span").attr("class", "tld-chip " + cls).attr("title", String(it[0])).text(visible(it[0]));
        row.append("span").attr("class", "tld-val").text(fmt(it[1]) + " ");
      });
    }

    function select(n) {
      state.selected = n;
      nodeSel.classed("tld-selected", function (m) { return m === n; });
      panel.selectAll("*").remove();
      if (!n) {
        panel.attr("data-selected", null);
        panel.append("div").attr("class", "tld-panel-hint")
          .text("Click a feature to see its inputs, examples and logit effects.");
        return;
      }
      panel.attr("data-selected", n.id);
      panel.append("div").attr("class", "tld-panel-title").text(n.siteLabel + " \u00b7 " + n.label);
      var dl = panel.append("dl").attr("class", "tld-panel-facts");
      var facts = [["site", n.site], ["id", n.id], ["importance", fmt(n.importance)]];
      if (hasModule(n)) facts.push(["module", String(n.module)]);
      if (n.input_total !== undefined) facts.push(["total input", fmt(n.input_total)]);
      if (n.mean_input !== undefined) facts.push(["from the mean", fmt(n.mean_input)]);
      facts.forEach(function (kv) { dl.append("dt").text(kv[0]); dl.append("dd").text(kv[1]); });

      var examples = n.examples || [];
      panel.append("div").attr("class", "tld-panel-h").text("Top-activating examples");
      var list = panel.append("div").attr("class", "tld-examples");
      if (!examples.length) list.append("div").attr("class", "tld-panel-hint").text("No examples for this feature.");
      examples.forEach(function (ex) {
        if (typeof ex === "string") list.append("div").attr("class", "tld-example").text(ex);
        else tokenExample(list, ex);
      });
      if (n.logits) {
        panel.append("div").attr("class", "tld-panel-h").text("Logit effects");
        var box = panel.append("div").attr("class", "tld-logits");
        chips(box, "promotes", n.logits.promoted, "tld-chip-pos");
        chips(box, "suppresses", n.logits.suppressed, "tld-chip-neg");
      }
      if (n.inc.length) {
        var carried = d3.sum(n.inc, function (e) { return e.share; });
        panel.append("div").attr("class", "tld-panel-h")
          .text("Strongest inputs (" + pct(carried) + " of its input)");
        var ul = panel.append("ul").attr("class", "tld-conn");
        n.inc.forEach(function (e) { connection(ul, e, e.source, pct(e.share)); });
      }
      if (n.out.length) {
        panel.append("div").attr("class", "tld-panel-h").text("Feeds into");
        var uo = panel.append("ul").attr("class", "tld-conn");
        n.out.slice(0, 12).forEach(function (e) { connection(uo, e, e.target, pct(e.share) + " of its input"); });
      }
    }

    fIn.on("input change", function () {
      var v = parseInt(this.value, 10);
      if (isFinite(v) && v >= 1) { state.features = Math.min(v, maxFeatures); draw(); }
    });
    sIn.on("input change", function () { state.share = parseInt(this.value, 10) / 100; draw(); });
    if (loIn) {
      var onRange = function () {
        var a = +loIn.property("value"), b = +hiIn.property("value");
        state.lo = Math.min(a, b);
        state.hi = Math.max(a, b);
        draw();
      };
      loIn.on("change", onRange);
      hiIn.on("change", onRange);
    }
    drawLegend();
    draw();
    select(opts.selected && byId.has(opts.selected) ? byId.get(opts.selected) : null);
    root.attr("data-rendered", "true");
  }

  window.tldGraph = { render: render };
})();
