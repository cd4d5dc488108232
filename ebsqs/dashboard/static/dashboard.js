// ebsqs dashboard: a little vanilla JavaScript. Every page works without it.
// - Pages whose content has data-refresh="N" (queues, workers, tasks) fetch themselves every
//   N seconds and swap the content in place. The dead-letters page never refreshes itself:
//   each view receives the messages it shows.
// - "Select all" ticks every box of the dead-letters form.
(function () {
  "use strict";

  function refresh(content) {
    var seconds = parseInt(content.getAttribute("data-refresh"), 10);
    if (!seconds) {
      return;
    }
    window.setTimeout(function () {
      fetch(window.location.href, { credentials: "same-origin" })
        .then(function (response) { return response.ok ? response.text() : null; })
        .then(function (text) {
          var current = document.getElementById("ebsqs-content");
          if (text && current) {
            var fresh = new DOMParser().parseFromString(text, "text/html")
              .getElementById("ebsqs-content");
            if (fresh) {
              current.replaceWith(fresh);
              current = fresh;
            }
          }
          refresh(current || content);
        })
        .catch(function () { refresh(content); });
    }, seconds * 1000);
  }

  document.addEventListener("click", function (event) {
    var target = event.target;
    if (target && target.classList && target.classList.contains("select-all")) {
      var boxes = target.form.querySelectorAll('input[type="checkbox"][name="id"]');
      var all = Array.prototype.every.call(boxes, function (box) { return box.checked; });
      Array.prototype.forEach.call(boxes, function (box) { box.checked = !all; });
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    var content = document.getElementById("ebsqs-content");
    if (content) {
      refresh(content);
    }
  });
})();
