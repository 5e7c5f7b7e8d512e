/* The submit form: show only the chosen source's, method's and calibration's inputs.
   Without scripts every group shows and the server reads only the chosen ones. */
"use strict";
(function () {
  const form = document.getElementById("job-form");
  if (!form) return;

  function sync() {
    for (const fs of form.querySelectorAll("[data-toggles]")) {
      const key = fs.dataset.toggles;
      const checked = fs.querySelector("input[type=radio]:checked");
      const value = checked ? checked.value : null;
      for (const group of form.querySelectorAll('[data-group="' + key + '"]')) {
        const active = group.dataset.value === value;
        group.toggleAttribute("data-inactive", !active);
      }
    }
  }

  form.addEventListener("change", (e) => {
    if (e.target.matches("[data-toggles] input[type=radio]")) sync();
  });
  sync();

  // After a refused submit, put the keyboard on the summary, whose links jump to each field.
  const summary = document.getElementById("error-summary");
  if (summary) {
    summary.focus();
    summary.addEventListener("click", (e) => {
      const link = e.target.closest("a[href^='#']");
      if (!link) return;
      const target = document.getElementById(link.getAttribute("href").slice(1));
      if (!target) return;
      e.preventDefault();
      const details = target.closest("details");
      if (details) details.open = true;
      const focusable = target.matches("input, select, textarea") ? target : target.querySelector("input:checked, input, select, textarea");
      (focusable || target).focus();
      target.scrollIntoView({ block: "center" });
    });
  }

  form.addEventListener("submit", () => {
    const btn = form.querySelector("button[type=submit]");
    // Disable after the submit is under way so a double click does not create two jobs.
    setTimeout(() => { btn.disabled = true; btn.textContent = "Submitting…"; }, 0);
  });
})();
