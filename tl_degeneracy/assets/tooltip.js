/* The hover tooltip both graph viewers of tl_degeneracy share (d3 v7, vendored as window.tldD3).
 *
 * window.tldTooltip(main) appends a hidden tooltip to `main` (a d3 selection) and returns
 * {show(event, rows), move(event), hide()}: rows are [key, value] pairs, written with d3's
 * text(), never as markup; the tooltip follows the pointer within `main`.
 */
(function () {
  "use strict";

  window.tldTooltip = function (main) {
    var tip = main.append("div").attr("class", "tld-tooltip").style("display", "none");

    function move(event) {
      var p = window.tldD3.pointer(event, main.node());
      tip.style("left", (p[0] + 14) + "px").style("top", (p[1] + 10) + "px");
    }

    return {
      show: function (event, rows) {
        tip.selectAll("*").remove();
        rows.forEach(function (row) {
          var line = tip.append("div");
          line.append("span").attr("class", "tld-tt-key").text(row[0] + ": ");
          line.append("span").text(row[1]);
        });
        tip.style("display", null);
        move(event);
      },
      move: move,
      hide: function () { tip.style("display", "none"); }
    };
  };
})();
