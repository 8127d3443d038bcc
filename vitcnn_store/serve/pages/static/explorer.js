// vitcnn explorer: the few things a page does in the browser (no libraries).
(function () {
  "use strict";
  var el = document.getElementById("page-data");
  var data = el ? JSON.parse(el.textContent) : null;

  // CKA heatmap: the value under the pointer; a click opens that pair (a stable URL).
  var matrix = document.getElementById("matrix");
  if (matrix && data && data.rows) {
    var tip = document.getElementById("tip");
    var cellAt = function (ev) {
      var box = matrix.getBoundingClientRect();
      var i = Math.floor((ev.clientY - box.top) / data.cell);
      var j = Math.floor((ev.clientX - box.left) / data.cell);
      return (i >= 0 && j >= 0 && i < data.rows.length && j < data.cols.length) ? [i, j] : null;
    };
    matrix.addEventListener("mousemove", function (ev) {
      var c = cellAt(ev);
      if (!c) { tip.style.display = "none"; return; }
      var v = data.values[c[0]][c[1]];
      var n = data.null ? data.null[c[0]][c[1]] : null;
      tip.textContent = data.rows[c[0]] + " × " + data.cols[c[1]] + ": " +
        (v === null ? "n/a" : v.toFixed(3)) + (n === null ? "" : " (null " + n.toFixed(3) + ")");
      tip.style.display = "block";
      tip.style.left = (c[1] + 1) * data.cell + 6 + "px";
      tip.style.top = c[0] * data.cell + "px";
    });
    matrix.addEventListener("mouseleave", function () { tip.style.display = "none"; });
    matrix.addEventListener("click", function (ev) {
      var c = cellAt(ev);
      if (!c) { return; }
      window.location.href = data.href + "?a=" + encodeURIComponent(data.rows[c[0]]) +
        "&b=" + encodeURIComponent(data.cols[c[1]]);
    });
  }

  // Image page: a click on a patch makes it the query of every attention map.
  var picker = document.getElementById("picker");
  if (picker && data && data.tokens) {
    var box = document.getElementById("qbox");
    var img = document.getElementById("main-image");
    var show = function (token) {
      for (var r = 0; r < data.rows; r++) {
        for (var c = 0; c < data.cols; c++) {
          if (data.tokens[r][c] === token) {
            var h = img.clientHeight / data.rows, w = img.clientWidth / data.cols;
            box.style.display = "block";
            box.style.top = r * h + "px"; box.style.left = c * w + "px";
            box.style.width = w - 4 + "px"; box.style.height = h - 4 + "px";
            return;
          }
        }
      }
      box.style.display = "none";
    };
    var choose = function (token) {
      var maps = document.querySelectorAll("img.attn");
      for (var k = 0; k < maps.length; k++) {
        maps[k].src = maps[k].getAttribute("data-template").replace("QUERY", String(token));
      }
      var u = new URL(window.location.href);
      u.searchParams.set("q", String(token));
      window.history.replaceState(null, "", u.toString());
      document.getElementById("query-name").textContent = "patch token " + token;
      show(token);
    };
    picker.addEventListener("click", function (ev) {
      var rect = img.getBoundingClientRect();
      var r = Math.floor((ev.clientY - rect.top) / rect.height * data.rows);
      var c = Math.floor((ev.clientX - rect.left) / rect.width * data.cols);
      if (r < 0 || c < 0 || r >= data.rows || c >= data.cols) { return; }
      var token = data.tokens[r][c];
      if (token >= 0) { choose(token); }
    });
    if (img.complete) { show(data.query); } else { img.addEventListener("load", function () { show(data.query); }); }
  }
})();
